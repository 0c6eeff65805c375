"""FLORA broker side: the aggregator that runs rounds and averages adapters. No torch."""
