-- Record a claim as sent: its units count as reported if its period is still current.
--
-- KEYS: 1 usage hash
-- ARGV: 1 the claim "period_start:reported:overage"  2 its period_start  3 its overage
-- Reply: 1 recorded, 2 the period rolled over meanwhile (sent, nothing more to record),
--        0 not our claim (another reporter committed it first)

if redis.call('HGET', KEYS[1], 'report_pending') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'report_pending', 'report_pending_at')
if redis.call('HGET', KEYS[1], 'carry_period_start') == ARGV[2] then
  -- The claim's period has ended (carried aside): record it there; drop the carry once
  -- everything it holds is reported.
  local carried = tonumber(redis.call('HGET', KEYS[1], 'carry_overage')) or 0
  if carried <= tonumber(ARGV[3]) then
    redis.call('HDEL', KEYS[1], 'carry_period_start', 'carry_period_end', 'carry_overage',
               'carry_reported')
  else
    redis.call('HSET', KEYS[1], 'carry_reported', ARGV[3])
  end
  return 1
end
if redis.call('HGET', KEYS[1], 'period_start') ~= ARGV[2] then return 2 end
redis.call('HSET', KEYS[1], 'reported', ARGV[3], 'reported_period', ARGV[2])
return 1
