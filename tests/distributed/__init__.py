"""Tests of the vocabulary-parallel loss over several processes."""
