-- Fewer index writes for each alarm. The due-rows index holds pending rows only: a delivered row leaves it
-- once and is not written into it again. Dead letters, which an operator lists, keep an index of their own
-- (they are few). The index by tenant served no query of the gateway's: reports and retention go by time,
-- and the one query by tenant (a device's alarms, which only the tests ask for) reads the table.
DROP INDEX outbox_due;
CREATE INDEX outbox_due ON outbox (priority, due_at) WHERE state = 'pending';
CREATE INDEX outbox_dead_letters ON outbox (alarm_id) WHERE state = 'dead_letter';
DROP INDEX alarms_tenant_received;
