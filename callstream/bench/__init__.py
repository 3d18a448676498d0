"""`callstream bench`: the pipeline's throughput, latency and cost, measured on this machine.

One run starts everything it measures on loopback in a temp directory (a real KRaft
broker, the ingress and the storage consumer as the same subprocesses a deployment
runs, a throwaway PostgreSQL cluster), measures, writes `bench-results/<timestamp>.json`
and a PNG chart, prints a table, and stops every process it started. See
docs/performance.md for what each figure means and how it is taken.
"""
