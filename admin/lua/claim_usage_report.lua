-- Claim the overage units of one account not yet reported to Stripe, before sending them.
-- The claim is written down first, so a process that dies after sending re-sends exactly
-- the same claim (same identifier: Stripe drops the duplicate) instead of a bigger one.
--
-- The meter event's timestamp is written down with the claim too: a resend must carry the
-- very same parameters, or Stripe refuses its idempotency key (and the identifier's dedupe
-- would rest on a different event).
--
-- KEYS: 1 usage hash (mg:{acct}:usage, written by gateway/lua/charge.lua)
-- ARGV: 1 now (unix seconds)
-- Reply: {0} nothing to report, or {1, "period_start:reported:overage", period_end, timestamp}
--   `reported` counts only for the period in `reported_period`: charge.lua starts a new
--   period with HSET and leaves our fields behind.

-- Inside the period the units belong to, so they land on its invoice.
local function stamp(period_end)
  local now = tonumber(ARGV[1])
  local ending = tonumber(period_end)
  if ending and ending - 1 < now then return ending - 1 end
  return now
end

local function claimed(claim, period_end)
  local at = stamp(period_end)
  redis.call('HSET', KEYS[1], 'report_pending', claim, 'report_pending_at', at)
  return {1, claim, period_end or '', at}
end

local pending = redis.call('HMGET', KEYS[1], 'report_pending', 'report_pending_at')
local h = redis.call('HMGET', KEYS[1], 'period_start', 'overage', 'reported',
                     'reported_period', 'period_end')
local c = redis.call('HMGET', KEYS[1], 'carry_period_start', 'carry_overage',
                     'carry_reported', 'carry_period_end')
if pending[1] then
  -- The end of the claim's own period: the carried one's, if its period has ended since.
  local ending = h[5]
  if c[1] and string.sub(pending[1], 1, #c[1] + 1) == c[1] .. ':' then ending = c[4] end
  if pending[2] then return {1, pending[1], ending or '', tonumber(pending[2])} end
  return claimed(pending[1], ending)  -- a claim written before timestamps were kept
end
-- Overage of a period that ended before it was reported (charge.lua carried it aside).
if c[1] and (tonumber(c[2]) or 0) > (tonumber(c[3]) or 0) then
  return claimed(c[1] .. ':' .. c[3] .. ':' .. c[2], c[4])
end
local ps = h[1]
if not ps then return {0} end
local overage = tonumber(h[2]) or 0
local reported = 0
if h[4] == ps then reported = tonumber(h[3]) or 0 end
if overage <= reported then return {0} end
return claimed(ps .. ':' .. reported .. ':' .. overage, h[5])
