package main

// Bootstrap: the first connections of a daemon and the ones it keeps to its bootstrap peers.

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"strings"
	"sync"
	"time"

	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
)

func shufflePeers(peers []peer.AddrInfo) []peer.AddrInfo {
	shuffled := append([]peer.AddrInfo(nil), peers...)
	rand.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
	return shuffled
}

// bootstrap connects to the bootstrap peers and starts the DHT. With explicit -bootstrapPeers, start-up fails
// if none of them can be reached (like the original daemon); the public IPFS peers are contacted in the
// background instead, so that a machine without internet access still starts quickly.
func (d *daemon) bootstrap() error {
	if len(d.cfg.bootstrapPeers) == 0 {
		go func() {
			peers := dht.GetDefaultBootstrapPeerAddrInfos()
			if connected, _ := d.connectToSome(peers); connected == 0 {
				log.Warnw("could not connect to any of the public IPFS bootstrap peers")
			}
			d.startDHT()
			d.keepBootstrapConnections(peers)
		}()
		return nil
	}
	for _, p := range d.cfg.bootstrapPeers {
		d.host.Peerstore().AddAddrs(p.ID, p.Addrs, peerstore.PermanentAddrTTL)
	}
	if connected, dialErr := d.connectToSome(d.cfg.bootstrapPeers); connected == 0 {
		// the first words are the original daemon's; the rest says which peer failed and why (one line)
		why := strings.Join(strings.Fields(dialErr.Error()), " ")
		return fmt.Errorf("failed to connect to bootstrap peers: could not reach any of the %d given (%s); check "+
			"the addresses and that those peers are running", len(d.cfg.bootstrapPeers), why)
	}
	d.startDHT()
	go d.keepBootstrapConnections(d.cfg.bootstrapPeers)
	return nil
}

func (d *daemon) startDHT() {
	if d.dht != nil {
		if err := d.dht.Bootstrap(d.ctx); err != nil {
			log.Warnw("DHT bootstrap failed", "error", err)
		}
	}
}

// connectToSome dials the peers concurrently and returns as soon as one connection succeeds (the other dials
// continue in the background, up to bootstrapConnections in total), or 0 when all of them failed.
func (d *daemon) connectToSome(peers []peer.AddrInfo) (int, error) {
	if len(peers) == 0 {
		return 0, errors.New("no peers given")
	}
	ctx, cancel := context.WithTimeout(d.ctx, bootstrapTimeout)
	results := make(chan error, len(peers))
	var wg sync.WaitGroup
	for _, p := range shufflePeers(peers) {
		if p.ID == d.host.ID() {
			results <- fmt.Errorf("%s is this peer itself", p.ID)
			continue
		}
		wg.Add(1)
		go func(p peer.AddrInfo) {
			defer wg.Done()
			err := d.host.Connect(ctx, p)
			if err != nil {
				log.Debugw("cannot connect to bootstrap peer", "peer", p.ID, "error", err)
			} else {
				d.host.ConnManager().TagPeer(p.ID, "bootstrap", 1)
			}
			results <- err
		}(p)
	}
	go func() {
		wg.Wait()
		cancel()
	}()
	var firstErr error
	for range peers {
		err := <-results
		if err == nil {
			return 1, nil
		}
		if firstErr == nil {
			firstErr = err
		}
	}
	return 0, firstErr
}

func (d *daemon) keepBootstrapConnections(peers []peer.AddrInfo) {
	ticker := time.NewTicker(15 * time.Minute)
	defer ticker.Stop()
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-ticker.C:
			if len(d.host.Network().Peers()) < bootstrapConnections {
				d.connectToSome(peers)
			}
		}
	}
}
