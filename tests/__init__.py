"""The test suite: a package, so that tests import their helpers by name (tests.helpers)."""
