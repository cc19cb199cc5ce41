-- Claim the overage units of one account not yet reported to Stripe, before sending them.
-- The claim is written down first, so a process that dies after sending re-sends exactly
-- the same claim (same identifier: Stripe drops the duplicate) instead of a bigger one.
--
-- KEYS: 1 usage hash (mg:{acct}:usage, written by gateway/lua/charge.lua)
-- Reply: {0} nothing to report, or {1, "period_start:reported:overage", period_end}
--   `reported` counts only for the period in `reported_period`: charge.lua starts a new
--   period with HSET and leaves our fields behind.

local pending = redis.call('HGET', KEYS[1], 'report_pending')
local h = redis.call('HMGET', KEYS[1], 'period_start', 'overage', 'reported',
                     'reported_period', 'period_end')
if pending then
  return {1, pending, h[5] or ''}
end
-- Overage of a period that ended before it was reported (charge.lua carried it aside).
local c = redis.call('HMGET', KEYS[1], 'carry_period_start', 'carry_overage',
                     'carry_reported', 'carry_period_end')
if c[1] and (tonumber(c[2]) or 0) > (tonumber(c[3]) or 0) then
  local carried = c[1] .. ':' .. c[3] .. ':' .. c[2]
  redis.call('HSET', KEYS[1], 'report_pending', carried)
  return {1, carried, c[4] or ''}
end
local ps = h[1]
if not ps then return {0} end
local overage = tonumber(h[2]) or 0
local reported = 0
if h[4] == ps then reported = tonumber(h[3]) or 0 end
if overage <= reported then return {0} end
local claim = ps .. ':' .. reported .. ':' .. overage
redis.call('HSET', KEYS[1], 'report_pending', claim)
return {1, claim, h[5] or ''}
