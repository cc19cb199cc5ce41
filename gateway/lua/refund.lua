-- Give back the units of a request the backend could not answer.
--
-- KEYS: 1 usage hash, 2 daily-by-route hash (the day of the charge)
-- ARGV: 1 period_start of the charge, 2 cost, 3 overage units of the charge, 4 route,
--       5 included units of the tier the charge applied
-- Reply: units refunded. A charge from a period that has since ended is not refunded into
-- the new one, and no counter goes below zero, so the count never drops under what was
-- really served (each charge is refunded at most once by the gateway).

local usage = redis.call('HMGET', KEYS[1], 'period_start', 'used', 'overage')
if tonumber(usage[1]) ~= tonumber(ARGV[1]) then
  return 0
end
local used = tonumber(usage[2]) or 0
local units = math.min(tonumber(ARGV[2]), used)
if units <= 0 then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'used', -units)
-- Overage is what lies beyond the included units. Taking back only this charge's own
-- overage is not enough: a charge inside the quota refunded after a later one went over
-- (X 998->1000, Y 1000->1002, X refunded) leaves used at 1000, so Y's 2 units fit after
-- all. So overage falls to what the remaining usage exceeds, and never rises here (a
-- plan changed since the charge may have left it lower than that).
local overage = tonumber(usage[3]) or 0
local left = math.max(0, math.min(overage - tonumber(ARGV[3]), used - units - tonumber(ARGV[5])))
if left < overage then
  redis.call('HSET', KEYS[1], 'overage', left)
end
local daily = tonumber(redis.call('HGET', KEYS[2], ARGV[4])) or 0
if daily > 0 then
  redis.call('HINCRBY', KEYS[2], ARGV[4], -math.min(units, daily))
end
return units
