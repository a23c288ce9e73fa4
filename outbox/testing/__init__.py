"""Tools for testing code that uses outbox (provisional public API, like ``trio.testing``).

- ``fault_proxy``: a TCP proxy between a client and a server that cuts, stalls, truncates
  and refuses on a script, for fault-injection tests of your own deployment.
- ``round_robin``: the same proxy in front of several servers, each new connection to the
  next one that accepts, like a load balancer with no sticky sessions.
"""
