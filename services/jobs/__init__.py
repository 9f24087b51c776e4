"""Offline jobs on Ray: batch generation (Ray Data), HumanEval and its sandbox, Ray Train trainers."""
