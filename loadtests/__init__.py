"""Locust load tests of the OpenAI-compatible service (see loadtests/locustfile.py and `make loadtest`)."""
