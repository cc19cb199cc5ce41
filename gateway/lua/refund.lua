-- Give back the units of a request the backend could not answer.
--
-- KEYS: 1 usage hash, 2 daily-by-route hash (the day of the charge)
-- ARGV: 1 period_start of the charge, 2 cost, 3 overage units of the charge, 4 route
-- Reply: units refunded. A charge from a period that has since ended is not refunded into
-- the new one, and no counter goes below zero, so the count never drops under what was
-- really served (each charge is refunded at most once by the gateway).

local usage = redis.call('HMGET', KEYS[1], 'period_start', 'used', 'overage')
if tonumber(usage[1]) ~= tonumber(ARGV[1]) then
  return 0
end
local units = math.min(tonumber(ARGV[2]), tonumber(usage[2]) or 0)
if units <= 0 then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'used', -units)
local overage = math.min(tonumber(ARGV[3]), tonumber(usage[3]) or 0)
if overage > 0 then
  redis.call('HINCRBY', KEYS[1], 'overage', -overage)
end
local daily = tonumber(redis.call('HGET', KEYS[2], ARGV[4])) or 0
if daily > 0 then
  redis.call('HINCRBY', KEYS[2], ARGV[4], -math.min(units, daily))
end
return units
