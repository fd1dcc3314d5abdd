package main

import (
	"context"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/peer"
)

// autoRelayOption configures the circuit relay v2 client to reserve slots on relays: only the -trustedRelays
// when -relayDiscovery=0, otherwise the trusted relays followed by the DHT peers closest to us.
func (d *daemon) autoRelayOption() libp2p.Option {
	if !d.cfg.relayDiscovery {
		return libp2p.EnableAutoRelayWithStaticRelays(d.cfg.trustedRelays)
	}
	return libp2p.EnableAutoRelayWithPeerSource(func(ctx context.Context, numPeers int) <-chan peer.AddrInfo {
		out := make(chan peer.AddrInfo)
		go func() {
			defer close(out)
			send := func(info peer.AddrInfo) bool {
				if numPeers <= 0 {
					return false
				}
				select {
				case out <- info:
					numPeers--
					return true
				case <-ctx.Done():
					return false
				}
			}
			for _, relayInfo := range d.cfg.trustedRelays {
				if !send(relayInfo) {
					return
				}
			}
			if d.dht == nil || d.host == nil {
				return
			}
			closest, err := d.dht.GetClosestPeers(ctx, string(d.host.ID()))
			if err != nil {
				log.Debugw("relay discovery: no DHT peers yet", "error", err)
				return
			}
			for _, p := range closest {
				addrs := d.host.Peerstore().Addrs(p)
				if len(addrs) == 0 {
					continue
				}
				if !send(peer.AddrInfo{ID: p, Addrs: addrs}) {
					return
				}
			}
		}()
		return out
	})
}
