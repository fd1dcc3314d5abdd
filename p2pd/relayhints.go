package main

// How the rest of the network finds and reaches peers that are reachable only through a relay: the relay service
// records their circuit addresses, and the DHT keeps away from them (relay.go holds the reservations themselves).

import (
	"sync"
	"time"

	kad "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
)

// hasDirectConn reports whether we have a connection to p that does not go through a relay.
func hasDirectConn(h host.Host, p peer.ID) bool {
	for _, c := range h.Network().ConnsToPeer(p) {
		if !c.Stat().Transient {
			return true
		}
	}
	return false
}

// dhtRelayFilters keep the DHT away from peers it could only reach through a relay: its own requests may not use
// such limited connections, so a request to them waits (10 s and more) for a direct connection that never comes,
// and meanwhile holds the DHT's one request channel to that peer, which also stalls our look-up of that very peer
// (made with permission to use relays) when a stream to it is opened. Such peers are not added to the routing
// table, and not queried in look-ups unless they are the peer looked for.
func dhtRelayFilters() []kad.Option {
	return []kad.Option{kad.RoutingTableFilter(relayOnlyRTFilter), kad.QueryFilter(relayOnlyQueryFilter)}
}

// relayOnlyRTFilter admits to the routing table only peers we have a direct connection to.
func relayOnlyRTFilter(dhtInstance interface{}, p peer.ID) bool {
	return hasDirectConn(dhtInstance.(*kad.IpfsDHT).Host(), p)
}

// relayOnlyQueryFilter lets a look-up query a peer unless all its known addresses are relayed and we have no
// direct connection to it.
func relayOnlyQueryFilter(dhtInstance interface{}, info peer.AddrInfo) bool {
	if len(info.Addrs) == 0 || hasDirectConn(dhtInstance.(*kad.IpfsDHT).Host(), info.ID) {
		return true
	}
	for _, a := range info.Addrs {
		if _, err := a.ValueForProtocol(ma.P_CIRCUIT); err != nil {
			return true // an address that is not relayed
		}
	}
	return false
}

const (
	// reservationHintTTL is the lifetime of the addresses a relay records for the peers holding a reservation with
	// it; a TTL of its own, which identify's replacement of a peer's addresses leaves alone.
	reservationHintTTL = 59 * time.Minute
	// reservationHintInterval is how often those addresses are checked and restored.
	reservationHintInterval = 2 * time.Second
)

// reservationHints is the relay service's side: a peer that reserves a slot is reachable through us, so we record
// <our address>/p2p/<our id>/p2p-circuit among its addresses, and our DHT gives them to peers looking it up. The
// peer announces the same addresses itself, but identify replaces a peer's addresses with those of each message
// it receives, and two messages of the peer sent just before and after its addresses changed may be handled in
// either order: the peer would then stay unknown to the DHT until its addresses change again.
type reservationHints struct {
	d     *daemon
	mu    sync.Mutex
	peers map[peer.ID]time.Time // peer that asked for a reservation -> when it expires unless renewed
}

// startReservationHints returns the relay's ACL (which admits everyone and notes who reserves) and keeps the
// hint addresses until the daemon shuts down.
func (d *daemon) startReservationHints() *reservationHints {
	hints := &reservationHints{d: d, peers: map[peer.ID]time.Time{}}
	go hints.run()
	return hints
}

// AllowReserve admits every reservation (the relay's resource limits still apply) and records the hint at once.
func (r *reservationHints) AllowReserve(p peer.ID, _ ma.Multiaddr) bool {
	r.mu.Lock()
	r.peers[p] = time.Now().Add(reservationHintTTL)
	r.mu.Unlock()
	r.d.host.Peerstore().AddAddrs(p, r.ownCircuitAddrs(), reservationHintTTL)
	return true
}

// AllowConnect admits every relayed connection.
func (r *reservationHints) AllowConnect(peer.ID, ma.Multiaddr, peer.ID) bool { return true }

func (r *reservationHints) ownCircuitAddrs() []ma.Multiaddr {
	return circuitAddrs(r.d.host.ID(), r.d.host.Addrs())
}

func (r *reservationHints) run() {
	ticker := time.NewTicker(reservationHintInterval)
	defer ticker.Stop()
	for {
		select {
		case <-r.d.ctx.Done():
			return
		case <-ticker.C:
		}
		now, own := time.Now(), r.ownCircuitAddrs()
		r.mu.Lock()
		peers := make(map[peer.ID]time.Time, len(r.peers))
		for p, expiry := range r.peers {
			peers[p] = expiry
		}
		r.mu.Unlock()
		for p, expiry := range peers {
			h := r.d.host
			if now.After(expiry) || h.Network().Connectedness(p) != network.Connected {
				// the relay drops the reservation of a peer that disconnects
				r.mu.Lock()
				if r.peers[p] == expiry {
					delete(r.peers, p)
				}
				r.mu.Unlock()
				h.Peerstore().SetAddrs(p, own, 0)
				continue
			}
			h.Peerstore().AddAddrs(p, own, reservationHintTTL)
		}
	}
}
