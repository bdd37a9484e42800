"""Traffic capture: iptables rules generated as a pure function, applied by `sidemesh proxy init`."""
