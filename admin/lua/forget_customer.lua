-- Forget an account's billing customer, but only if it is still the one named: a customer
-- created since (by a new subscribe) must survive the late news of the old one's deletion.
--
-- KEYS: 1 the account's customer key (mg:{acct}:customer)
-- ARGV: 1 the deleted customer's id
-- Reply: 1 forgotten, 0 the key named another customer (or none)

if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
