"""Every metric flask-immutant exposes: name, help and labels, in one place.

docs/metrics.md lists the same names (``tests/test_metrics.py`` checks both ways). Call sites
import this module and record in one line, such as ``metrics.PUBLISHED.inc(destination)``.
"""

from __future__ import annotations

from .metric import Metric

#: Lease renewals are one round trip to the store: milliseconds, unless it struggles.
RENEW_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: Handler and balancer times: seven buckets, not prometheus_client's fifteen, as each is a series
#: per destination or backend that every scrape reads and writes (bench/metrics_scrape.py).
SECONDS_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10.0)
#: How late a job fires: a few milliseconds normally, seconds to minutes across a failover.
LATENESS_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# --- messaging ----------------------------------------------------------------------------

PUBLISHED = Metric("counter", "immutant_messages_published_total",
                   "Messages handed to the broker, per destination.", ("destination",))
DELIVERED = Metric("counter", "immutant_messages_delivered_total",
                   "Messages a listener handled without raising, per destination.", ("destination",))
FAILED = Metric("counter", "immutant_messages_failed_total",
                "Handler calls that raised, per destination (each attempt counts).", ("destination",))
RETRIED = Metric("counter", "immutant_messages_retried_total",
                 "Failed messages scheduled for another attempt, per destination.", ("destination",))
DEAD_LETTERED = Metric("counter", "immutant_messages_dead_lettered_total",
                       "Messages moved to the dead-letter store, per destination.", ("destination",))
REDELIVERED = Metric("counter", "immutant_messages_redelivered_total",
                     "Unacknowledged messages of a dead consumer put back on their queue, per destination "
                     "(Redis broker; RabbitMQ requeues them itself).", ("destination",))
HANDLER_SECONDS = Metric("histogram", "immutant_message_handler_seconds",
                         "Time a listener took to handle one message, per destination.", ("destination",),
                         buckets=SECONDS_BUCKETS)
IN_FLIGHT = Metric("gauge", "immutant_messages_in_flight",
                   "Messages being handled by this node's listeners now, per destination.", ("destination",))
QUEUE_DEPTH = Metric("gauge", "immutant_queue_depth",
                     "Messages waiting in a destination's queues (all subscriptions of a topic), read from "
                     "the broker at scrape time.", ("destination",), scraped=True)
QUEUE_DEAD = Metric("gauge", "immutant_queue_dead",
                    "Messages in a destination's dead-letter store, read at scrape time.", ("destination",),
                    scraped=True)
BROKER_UP = Metric("gauge", "immutant_broker_up",
                   "1 when the message broker counted every queue at the last reading, 0 when it did not "
                   "(its queues' depth and dead letters are then left out, not reported as 0); read at scrape "
                   "time.", scraped=True)

# --- singletons: leases, daemons, jobs ------------------------------------------------------

LEASE_ACQUIRED = Metric("counter", "immutant_lease_acquired_total",
                        "Times this node acquired a lease.", ("lease",))
LEASE_LOST = Metric("counter", "immutant_lease_lost_total",
                    "Times this node lost a lease it held (expired, taken, or not renewable in time).", ("lease",))
LEASE_RELEASED = Metric("counter", "immutant_lease_released_total",
                        "Times this node gave a lease up (stopping, or stepping aside).", ("lease",))
LEASE_RENEW_SECONDS = Metric("histogram", "immutant_lease_renew_seconds",
                             "Round trip of one lease renewal.", ("lease",), buckets=RENEW_BUCKETS)
LEASE_HOLDER = Metric("gauge", "immutant_lease_holder",
                      "1 while this node holds the lease, else 0.", ("lease",), mode="livemax")
DAEMON_RESTARTS = Metric("counter", "immutant_daemon_restarts_total",
                         "Times a singleton daemon was restarted after it failed or returned.", ("daemon",))
JOB_FIRES = Metric("counter", "immutant_job_fires_total", "Times a job fired on this node.", ("job",))
JOB_LATENESS_SECONDS = Metric("histogram", "immutant_job_lateness_seconds",
                              "How long after its due time a job fired.", ("job",), buckets=LATENESS_BUCKETS)
JOB_MISFIRES = Metric("counter", "immutant_job_misfires_total",
                      "Due times found later than the misfire threshold, by what the policy did "
                      "(fired once, or skipped).", ("job", "action"))

# --- cache and sessions ---------------------------------------------------------------------

CACHE_HITS = Metric("counter", "immutant_cache_hits_total", "Cache reads that found a value.", ("cache",))
CACHE_MISSES = Metric("counter", "immutant_cache_misses_total", "Cache reads that found nothing.", ("cache",))
CACHE_NEAR_HITS = Metric("counter", "immutant_cache_near_hits_total",
                         "Reads of an invalidated cache answered from this process's near cache.", ("cache",))
CACHE_INVALIDATIONS = Metric("counter", "immutant_cache_invalidations_total",
                             ("Invalidation notices a near cache received from the store "
                              "(the session near cache as cache=sessions)."), ("cache",))
BREAKER_OPEN = Metric("gauge", "immutant_store_breaker_open",
                      "1 while a circuit breaker in front of the store is open (cache, sessions), else 0.",
                      ("breaker",), mode="livemax")
SESSION_READS = Metric("counter", "immutant_session_reads_total", "Sessions read from the store.")
SESSION_WRITES = Metric("counter", "immutant_session_writes_total", "Sessions written to the store.")
SESSION_UNAVAILABLE = Metric("counter", "immutant_session_unavailable_total",
                             "Requests answered 503 because the session store was unavailable.")

# --- deployments, balancer, membership ------------------------------------------------------

DEPLOYMENT_STATE = Metric("gauge", "immutant_deployment_state",
                          "1 for each deployment on this node, labelled with its state there "
                          "(starting, deployed, failed...); read at scrape time.", ("deployment", "state"),
                          scraped=True)
LOAD_FACTOR = Metric("gauge", "immutant_context_load_factor",
                     "Load factor (1-100, higher is more room) this node publishes for each context; "
                     "read at scrape time.", ("context",), scraped=True)
MEMBERS = Metric("gauge", "immutant_cluster_members", "Live members of the cluster; read at scrape time.",
                 scraped=True)
BALANCER_REQUESTS = Metric("counter", "immutant_balancer_requests_total",
                           "Requests the embedded balancer forwarded, per backend node, context and status class.",
                           ("backend", "context", "status"))
BALANCER_SECONDS = Metric("histogram", "immutant_balancer_request_seconds",
                          "Time from the balancer receiving a request to the backend's response head.",
                          ("backend", "context"), buckets=SECONDS_BUCKETS)
BALANCER_RETRIES = Metric("counter", "immutant_balancer_retries_total",
                          "Requests the embedded balancer retried on another backend after this one failed.",
                          ("backend", "context"))

#: Every metric, in the order docs/metrics.md lists them.
ALL: tuple[Metric, ...] = tuple(value for value in list(globals().values()) if isinstance(value, Metric))
