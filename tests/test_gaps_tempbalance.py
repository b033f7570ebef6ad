"""Tests written against surviving mutants of benchmarks/mutation.sh (tempbalance modules): each checks a value a planted bug changes."""
