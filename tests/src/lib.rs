//! `fathom-tests`: harness for end-to-end tests (locating the built `fathom` binary, free
//! loopback ports, starting a real etcd). The tests themselves live in `tests/tests/`.
