-- Duplicates are now found through the keys of the window's alarms, held in memory by each process
-- (src/store/recent.rs) and loaded by time when it starts. The index in key order made every new
-- alarm write a page picked at random; the index by time only ever appends.
DROP INDEX alarms_dedupe;
CREATE INDEX alarms_received ON alarms (received_at);
