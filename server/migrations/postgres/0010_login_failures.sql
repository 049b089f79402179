-- Wrong passwords per account, shared by every instance: password guessing must not scale with
-- the number of instances behind the load balancer.
CREATE TABLE login_failures (
    email TEXT NOT NULL,
    at BIGINT NOT NULL
);
CREATE INDEX login_failures_email_at ON login_failures (email, at);
CREATE INDEX login_failures_at ON login_failures (at);
