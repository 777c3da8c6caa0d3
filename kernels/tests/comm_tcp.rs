//! The collective conformance suite on `TcpComm`: each rank a thread owning its own TCP mesh
//! endpoint over real loopback sockets (the separate-process cases are in `comm_processes.rs`).

fathom_kernels::collective_conformance!(fathom_kernels::comm::conformance::TcpLoopbackFactory);

mod rendezvous {
    use fathom_kernels::comm::{Collective, CommError, CommOptions, TcpComm, TcpRendezvous};
    use std::time::{Duration, Instant};

    fn opts(connect_ms: u64) -> CommOptions {
        CommOptions { connect_timeout: Duration::from_millis(connect_ms), ..Default::default() }
    }

    #[test]
    fn a_rank_that_never_joins_is_named() {
        let rv = TcpRendezvous::bind("127.0.0.1:0").unwrap();
        let addr = rv.local_addr().unwrap().to_string();
        let t = Instant::now();
        let (host, joiner) = std::thread::scope(|s| {
            let j = s.spawn(|| TcpComm::connect(&addr, 1, 3, opts(400)));
            (rv.into_comm(3, opts(400)), j.join().unwrap())
        });
        match host.unwrap_err() {
            CommError::Timeout { op: "rendezvous", missing_ranks, .. } => {
                assert_eq!(missing_ranks, vec![2])
            }
            other => panic!("expected a rendezvous timeout, got {other}"),
        }
        assert!(matches!(joiner.unwrap_err(), CommError::Rendezvous { .. }));
        assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());
    }

    #[test]
    fn disagreeing_world_sizes_are_refused() {
        let rv = TcpRendezvous::bind("127.0.0.1:0").unwrap();
        let addr = rv.local_addr().unwrap().to_string();
        let (host, _joiner) = std::thread::scope(|s| {
            let j = s.spawn(|| TcpComm::connect(&addr, 1, 3, opts(2000)));
            (rv.into_comm(2, opts(2000)), j.join().unwrap())
        });
        let e = host.unwrap_err();
        assert!(e.to_string().contains("rank 1 of world 3"), "{e}");
    }

    #[test]
    fn connect_with_rank_zero_hosts_the_rendezvous() {
        // Rank 0 through `connect` binds the given address itself; pick a free port first.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let mut comms = std::thread::scope(|s| {
            let j = s.spawn(|| TcpComm::connect(&addr, 1, 2, opts(5000)).unwrap());
            let c0 = TcpComm::connect(&addr, 0, 2, opts(5000)).unwrap();
            vec![c0, j.join().unwrap()]
        });
        let sums: Vec<f32> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter_mut()
                .map(|c| {
                    s.spawn(move || {
                        let mut x = [c.rank() as f32 + 1.0];
                        c.all_reduce_sum_f32(&mut x).unwrap();
                        x[0]
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(sums, vec![3.0, 3.0]);
        assert_eq!(comms[1].members(), &[0, 1]);
    }
}
