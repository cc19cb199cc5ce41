-- Decide and charge one request, atomically: read the account's plan, pick the tier whose
-- rules apply, start a fresh count at each new period, apply the rate limit, add the cost.
--
-- KEYS: 1 plan hash, 2 usage hash, 3 daily-by-route hash, 4 GCRA timestamp
--       (all with the account's {hash tag}: one slot, so this runs on Redis Cluster)
-- ARGV: 1 now (ms)           2 tier table "name,included,overage(0|1),cap(-1=none),interval_us,burst;..."
--       3 calendar month start (s)   4 calendar month end (s)   5 cost   6 route
--       7 daily TTL (s)      8 past_due grace (s)   9 allowed tiers ",a,b," or ""
-- Reply: {allowed, reason, used, included, reset_s, tier, period_start, overage_units, retry_ms}
--   cost 0 (a free route restricted to some tiers) only checks the tier
--   reason: 0 ok, 1 quota exhausted, 2 overage cap reached, 3 rate limited, 4 tier not allowed

local now_ms = tonumber(ARGV[1])
local now = math.floor(now_ms / 1000)
local cost = tonumber(ARGV[5])

-- The table's row for one tier, found by a plain search (no pattern scan of every row).
local tiers = ';' .. ARGV[2] .. ';'
local function tier_rules(name)
  local at = string.find(tiers, ';' .. name .. ',', 1, true)
  if not at then return nil end
  local inc, ov, cap, interval, burst =
      string.match(tiers, '^(%d+),(%d),(%-?%d+),(%d+),(%d+);', at + #name + 2)
  if not inc then return nil end
  return tonumber(inc), ov == '1', tonumber(cap), tonumber(interval), tonumber(burst)
end

local plan = redis.call('HMGET', KEYS[1], 'tier', 'status', 'period_start', 'period_end', 'past_due_since')
local tier = 'free'
local pstart, pend = tonumber(ARGV[3]), tonumber(ARGV[4])

if plan[1] and plan[1] ~= 'free' and tier_rules(plan[1]) then
  local status = plan[2]
  local in_good_standing = status == 'active' or status == 'trialing'
  if status == 'past_due' then
    local since = tonumber(plan[5]) or now
    in_good_standing = now - since <= tonumber(ARGV[8])
  end
  local s, e = tonumber(plan[3]), tonumber(plan[4])
  if in_good_standing and s and e and e > s then
    if now >= e then
      -- The renewal event has not arrived (yet): a paying customer is not blocked, the
      -- period rolls forward by its own length until the webhook brings the real one.
      local len = e - s
      s = s + math.floor((now - s) / len) * len
      e = s + len
      redis.call('HSET', KEYS[1], 'period_start', s, 'period_end', e)
    end
    tier, pstart, pend = plan[1], s, e
  elseif s and e and s <= now and now < e then
    -- Lapsed inside its paid period: free rules, but on the same count. Starting a fresh
    -- calendar-month count would overwrite the paid period's usage, losing overage not
    -- yet billed, and a recovered payment would then start that period from zero.
    pstart, pend = s, e
  end
end

local included, overage_ok, cap, interval, burst = tier_rules(tier)
if not included then
  return redis.error_reply('tier table has no ' .. tier)
end
local reset = pend - now

local usage = redis.call('HMGET', KEYS[2], 'period_start', 'used')
local same_period = tonumber(usage[1]) == pstart
local used = same_period and (tonumber(usage[2]) or 0) or 0

if ARGV[9] ~= '' and not string.find(ARGV[9], ',' .. tier .. ',', 1, true) then
  return {0, 4, used, included, reset, tier, pstart, 0, 0}
end
if cost == 0 then
  -- A free route restricted to some tiers: only the tier check applies; nothing is
  -- counted, and a used-up quota does not close a route that costs nothing.
  return {1, 0, used, included, reset, tier, pstart, 0, 0}
end

-- GCRA: at most `burst` requests at once, then one per interval. The arrival time is kept
-- in ms with microsecond decimals, so limits above 1000/s keep their rate.
local new_tat
if interval > 0 then
  interval = interval / 1000
  local tat = tonumber(redis.call('GET', KEYS[4])) or now_ms
  if tat < now_ms then tat = now_ms end
  new_tat = tat + interval
  local allow_at = new_tat - burst * interval
  if now_ms < allow_at then
    return {0, 3, used, included, reset, tier, pstart, 0, math.ceil(allow_at - now_ms)}
  end
end

local new_used = used + cost
local overage = 0
if new_used > included then
  overage = math.min(cost, new_used - included)
  if not overage_ok then
    return {0, 1, used, included, reset, tier, pstart, 0, reset * 1000}
  end
  if cap >= 0 and new_used - included > cap then
    return {0, 2, used, included, reset, tier, pstart, 0, reset * 1000}
  end
end

if new_tat then
  -- Kept a second past the arrival time: Redis expires keys by its own clock, not the
  -- gateway's, and a state lost early would hand out a fresh burst.
  redis.call('SET', KEYS[4], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now_ms) + 1000)
end
if same_period then
  redis.call('HINCRBY', KEYS[2], 'used', cost)
  if overage > 0 then redis.call('HINCRBY', KEYS[2], 'overage', overage) end
else
  -- A new period. Overage of the old one not yet reported to Stripe is carried aside, so
  -- the usage reporter still bills it (admin/lua/claim_usage_report.lua) after rollover.
  local old = redis.call('HMGET', KEYS[2], 'period_start', 'period_end', 'overage',
                         'reported', 'reported_period')
  if old[1] then
    local old_overage = tonumber(old[3]) or 0
    local old_reported = (old[5] == old[1]) and (tonumber(old[4]) or 0) or 0
    if old_overage > old_reported then
      redis.call('HSET', KEYS[2], 'carry_period_start', old[1], 'carry_overage', old_overage,
                 'carry_reported', old_reported)
      if old[2] then redis.call('HSET', KEYS[2], 'carry_period_end', old[2]) end
    end
  end
  redis.call('HSET', KEYS[2], 'period_start', pstart, 'period_end', pend, 'used', cost, 'overage', overage)
end
-- The day's hash gets its TTL when a route's count starts (that day's key is written
-- only that day, so it lives TTL after the day), not again on every charge.
if redis.call('HINCRBY', KEYS[3], ARGV[6], cost) == cost then
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[7]))
end
return {1, 0, new_used, included, reset, tier, pstart, overage, 0}
