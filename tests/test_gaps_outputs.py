"""Tests written against surviving mutants of benchmarks/mutation.sh (outputs modules): each checks a value a planted bug changes."""
