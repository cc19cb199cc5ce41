-- Apply one billing change to the plan the gateway enforces, atomically and in order.
-- Stripe does not order webhook deliveries: a change applies only when its event is newer
-- than the last one applied (created seconds, then event id as tiebreak). A state fetched
-- from Stripe just now ("fresh") is newer than anything applied before, so it skips that test.
--
-- KEYS: 1 plan hash (the account's {hash tag})
-- ARGV: 1 event created (s)  2 event id  3 now (s)  4 op "set" | "free"
--       5 subscription id ("" unknown)  6 may replace another subscription (1|0)
--       7 fresh (1|0)  8 past_due since (s, used when status becomes past_due)
--       9.. field, value pairs (tier, status, period_start, period_end, customer_id, ...)
-- Reply: {applied 1|0, reason, tier, status, previous tier, previous status}
--   reason: applied, stale, other_subscription, ended

local plan = KEYS[1]
local created, id = tonumber(ARGV[1]), ARGV[2]
local stored = redis.call('HMGET', plan, 'event_created', 'event_id', 'subscription_id', 'tier',
  'status', 'ended_subscription')
local prev_tier, prev_status = stored[4] or 'free', stored[5] or ''
local stored_created = tonumber(stored[1])
local fresh = ARGV[7] == '1'
local sub = ARGV[5]

-- A subscription that ended never comes back (Stripe does not reuse its ids): a later
-- event about it (the final invoice paid, an update in the same second as the deletion)
-- must not revive the plan it paid for.
if sub ~= '' and stored[6] == sub then
  return {0, 'ended', prev_tier, prev_status, prev_tier, prev_status}
end

if stored_created and not fresh then
  if created < stored_created or (created == stored_created and id <= (stored[2] or '')) then
    return {0, 'stale', prev_tier, prev_status, prev_tier, prev_status}
  end
end

-- An event about another subscription than the plan's (an old one ending, an invoice of a
-- replaced one) must not touch the current plan; only a live new subscription replaces it.
if sub ~= '' and stored[3] and stored[3] ~= sub and ARGV[6] ~= '1' then
  return {0, 'other_subscription', prev_tier, prev_status, prev_tier, prev_status}
end

if stored_created and (created < stored_created or (created == stored_created and id < (stored[2] or ''))) then
  created, id = stored_created, stored[2] or ''
end

if ARGV[4] == 'free' then
  redis.call('HDEL', plan, 'period_start', 'period_end', 'past_due_since', 'subscription_id',
    'cancel_at_period_end')
  redis.call('HSET', plan, 'tier', 'free', 'status', 'canceled')
  if sub ~= '' then redis.call('HSET', plan, 'ended_subscription', sub) end
else
  local status
  for i = 9, #ARGV, 2 do
    redis.call('HSET', plan, ARGV[i], ARGV[i + 1])
    if ARGV[i] == 'status' then status = ARGV[i + 1] end
  end
  if sub ~= '' then redis.call('HSET', plan, 'subscription_id', sub) end
  if sub ~= '' and (status == 'canceled' or status == 'incomplete_expired') then
    redis.call('HSET', plan, 'ended_subscription', sub)
  end
  if status == 'past_due' then
    -- The grace period counts from the first failure, not from the latest retry.
    if prev_status ~= 'past_due' or redis.call('HEXISTS', plan, 'past_due_since') == 0 then
      redis.call('HSET', plan, 'past_due_since', ARGV[8])
    end
  elseif status then
    redis.call('HDEL', plan, 'past_due_since')
  end
end
redis.call('HSET', plan, 'event_created', created, 'event_id', id, 'updated_at', ARGV[3])
local now = redis.call('HMGET', plan, 'tier', 'status')
return {1, 'applied', now[1] or 'free', now[2] or '', prev_tier, prev_status}
