-- Decide and charge requests, atomically, each on its own: read the account's plan, pick
-- the tier whose rules apply, start a fresh count at each new period, apply the rate limit,
-- add the cost. One call carries one charge or many (a batch costs Redis one script run,
-- not one per request); each is decided exactly as if it ran alone, in order.
--
-- KEYS, 3 per charge i (from 0): 3i+1 plan hash, 3i+2 usage hash (its `tat` field is the
--       rate limiter's state), 3i+3 daily-by-route hash (all with the account's {hash tag}:
--       one charge per call on Redis Cluster, whose calls must keep to one slot)
-- Each command a script calls costs Redis about a microsecond and Redis serves every
-- worker, so a charge reads the usage hash once and writes it once: 4 commands, but for a
-- new period's first charge and a day's first on a route.
-- ARGV: 1 now (ms)   2 tier table "name,included,overage(0|1),cap(-1=none),interval_us,burst;..."
--       3 calendar month start (s)   4 calendar month end (s)   5 daily TTL (s)
--       6 past_due grace (s); then 3 per charge i: 6+3i+1 cost, 6+3i+2 route,
--       6+3i+3 allowed tiers ",a,b," or ""
-- Reply: one flat list, the charges' entries in order. A charge's entry is 4 integers,
--   code (reason + 8 x tier row), used, reset_s, period_start; a rate-limited refusal
--   adds retry_ms; a charge that failed is one error instead. The row is the rules' in
--   the tier table, counted from 0. Flat, and no more integers than the gateway needs:
--   it parses one entry per request, and takes the included units (the row's) and the
--   overage (the cost beyond them) from what it knows.
--   cost 0 (a free route restricted to some tiers) only checks the tier
--   reason: 0 ok, 1 quota exhausted, 2 overage cap reached, 3 rate limited, 4 tier not allowed

local now_ms = tonumber(ARGV[1])
local now = math.floor(now_ms / 1000)
local month_start, month_end = tonumber(ARGV[3]), tonumber(ARGV[4])
local daily_ttl, grace = tonumber(ARGV[5]), tonumber(ARGV[6])

-- The table's row for one tier, found by a plain search (no pattern scan of every row)
-- the first time the call needs that tier, then kept: a call carries a batch of charges.
-- Its position (the separators before it) is what the reply names the tier by.
local tiers = ';' .. ARGV[2] .. ';'
local rules = {}
local function tier_rules(name)
  local r = rules[name]
  if r == nil then
    r = false
    local at = string.find(tiers, ';' .. name .. ',', 1, true)
    if at then
      local inc, ov, cap, interval, burst =
          string.match(tiers, '^(%d+),(%d),(%-?%d+),(%d+),(%d+);', at + #name + 2)
      if inc then
        local row, sep = 0, string.find(tiers, ';', 2, true)
        while sep and sep <= at do
          row = row + 1
          sep = string.find(tiers, ';', sep + 1, true)
        end
        r = {tonumber(inc), ov == '1', tonumber(cap), tonumber(interval), tonumber(burst), row}
      end
    end
    rules[name] = r
  end
  if not r then return nil end
  return r[1], r[2], r[3], r[4], r[5], r[6]
end

local function answer(reason, used, reset, row, pstart)
  return {reason + 8 * row, used, reset, pstart}
end

local function rate_limited(used, reset, row, pstart, retry_ms)
  return {3 + 8 * row, used, reset, pstart, retry_ms}
end

-- One charge: its keys, cost, route and allowed tiers.
local function charge(plan_key, usage_key, daily_key, cost, route, allowed)
  local plan = redis.call('HMGET', plan_key, 'tier', 'status', 'period_start', 'period_end',
                          'past_due_since', 'cancel_at_period_end')
  local tier = 'free'
  local pstart, pend = month_start, month_end

  if plan[1] and plan[1] ~= 'free' and tier_rules(plan[1]) then
    local status = plan[2]
    local in_good_standing = status == 'active' or status == 'trialing'
    if status == 'past_due' then
      local since = tonumber(plan[5]) or now
      in_good_standing = now - since <= grace
    end
    local s, e = tonumber(plan[3]), tonumber(plan[4])
    if plan[6] == '1' and e and now >= e then
      -- Set to cancel at this period's end, which has passed: it does not renew, whether or
      -- not the deletion's webhook has come. Free rules from here.
      in_good_standing = false
    end
    if in_good_standing and s and e and e > s then
      if now >= e then
        -- The renewal event has not arrived (yet): a paying customer is not blocked, the
        -- period rolls forward by its own length until the webhook brings the real one.
        local len = e - s
        s = s + math.floor((now - s) / len) * len
        e = s + len
        redis.call('HSET', plan_key, 'period_start', s, 'period_end', e)
      end
      tier, pstart, pend = plan[1], s, e
    elseif s and e and s <= now and now < e then
      -- Lapsed inside its paid period: free rules, but on the same count. Starting a fresh
      -- calendar-month count would overwrite the paid period's usage, losing overage not
      -- yet billed, and a recovered payment would then start that period from zero.
      pstart, pend = s, e
    end
  end

  local included, overage_ok, cap, interval, burst, row = tier_rules(tier)
  if not included then
    return redis.error_reply('tier table has no ' .. tier)
  end
  local reset = pend - now

  local usage = redis.call('HMGET', usage_key, 'period_start', 'used', 'overage', 'tat')
  local same_period = tonumber(usage[1]) == pstart
  local used = same_period and (tonumber(usage[2]) or 0) or 0

  if allowed ~= '' and not string.find(allowed, ',' .. tier .. ',', 1, true) then
    return answer(4, used, reset, row, pstart)
  end
  if cost == 0 then
    -- A free route restricted to some tiers: only the tier check applies; nothing is
    -- counted, and a used-up quota does not close a route that costs nothing.
    return answer(0, used, reset, row, pstart)
  end

  -- GCRA: at most `burst` requests at once, then one per interval. The arrival time is kept
  -- in ms with microsecond decimals, so limits above 1000/s keep their rate. One in the
  -- past counts as now: a state left from long ago gives a fresh burst, no more.
  local new_tat
  if interval > 0 then
    interval = interval / 1000
    local tat = tonumber(usage[4]) or now_ms
    if tat < now_ms then tat = now_ms end
    new_tat = tat + interval
    local allow_at = new_tat - burst * interval
    if now_ms < allow_at then
      return rate_limited(used, reset, row, pstart, math.ceil(allow_at - now_ms))
    end
  end

  local new_used = used + cost
  local overage = 0
  if new_used > included then
    overage = math.min(cost, new_used - included)
    if not overage_ok then
      return answer(1, used, reset, row, pstart)
    end
    if cap >= 0 and new_used - included > cap then
      return answer(2, used, reset, row, pstart)
    end
  end

  -- The usage hash in one write: the script runs alone, so the values read above are
  -- still the hash's, and setting them is the same as adding to them.
  local fields = {'used', new_used}
  if new_tat then
    fields[3], fields[4] = 'tat', string.format('%.3f', new_tat)
  end
  if same_period then
    if overage > 0 then
      fields[#fields + 1], fields[#fields + 2] = 'overage', (tonumber(usage[3]) or 0) + overage
    end
    redis.call('HSET', usage_key, unpack(fields))
  else
    -- A new period. Overage of the old one not yet reported to Stripe is carried aside, so
    -- the usage reporter still bills it (admin/lua/claim_usage_report.lua) after rollover.
    -- The old period's start and overage are in the read above; the rest is read here.
    local old_start = usage[1]
    if old_start then
      local old = redis.call('HMGET', usage_key, 'period_end', 'reported', 'reported_period')
      local old_overage = tonumber(usage[3]) or 0
      local old_reported = (old[3] == old_start) and (tonumber(old[2]) or 0) or 0
      if old_overage > old_reported then
        redis.call('HSET', usage_key, 'carry_period_start', old_start, 'carry_overage',
                   old_overage, 'carry_reported', old_reported)
        if old[1] then redis.call('HSET', usage_key, 'carry_period_end', old[1]) end
      end
    end
    redis.call('HSET', usage_key, 'period_start', pstart, 'period_end', pend, 'overage', overage,
               unpack(fields))
  end
  -- The day's hash gets its TTL when a route's count starts (that day's key is written
  -- only that day, so it lives TTL after the day), not again on every charge.
  if redis.call('HINCRBY', daily_key, route, cost) == cost then
    redis.call('EXPIRE', daily_key, daily_ttl)
  end
  return answer(0, new_used, reset, row, pstart)
end

local replies, n = {}, 0
for i = 0, #KEYS / 3 - 1 do
  local k, a = 3 * i, 6 + 3 * i
  -- A charge that fails (a key of the wrong type, say) answers an error for itself alone;
  -- the charges before it stay applied and those after it still run.
  local ok, reply = pcall(charge, KEYS[k + 1], KEYS[k + 2], KEYS[k + 3],
                          tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3])
  if ok and reply.err == nil then
    for j = 1, #reply do
      replies[n + j] = reply[j]
    end
    n = n + #reply
  else
    n = n + 1
    replies[n] = redis.error_reply(type(reply) == 'table' and reply.err or tostring(reply))
  end
end
return replies
