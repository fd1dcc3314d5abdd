package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	ma "github.com/multiformats/go-multiaddr"
)

// controlReadBufferSize is the buffered reader's size on control connections; a STREAM_OPEN connection keeps
// using this reader for the raw stream bytes, so it is also a copy buffer.
const controlReadBufferSize = 64 * 1024

// handleConn serves one control connection: requests until EOF, or until it becomes a stream pipe or a
// persistent connection. A malformed request is answered with ERROR and ends the connection.
func (d *daemon) handleConn(conn net.Conn) {
	defer func() {
		if r := recover(); r != nil {
			log.Errorw("internal error while serving a control connection", "panic", r)
			_ = conn.Close()
		}
	}()
	r := bufio.NewReaderSize(conn, controlReadBufferSize)
	for {
		msg, err := readDelimited(r, d.maxMsg)
		if err != nil {
			var tooLarge *tooLargeError
			if errors.As(err, &tooLarge) {
				_ = writeDelimited(conn, encodeErrorResponse(err.Error()))
			} else if err != io.EOF {
				log.Debugw("cannot read a control request", "error", err)
			}
			_ = conn.Close()
			return
		}
		req, err := decodeRequest(msg)
		if err != nil {
			_ = writeDelimited(conn, encodeErrorResponse(err.Error()))
			_ = conn.Close()
			return
		}
		var resp []byte
		switch req.typ {
		case reqIdentify:
			resp = d.doIdentify()
		case reqConnect:
			resp = d.doConnect(req)
		case reqStreamOpen:
			var stream network.Stream
			var pipe *shmPipeFile
			resp, stream, pipe = d.doStreamOpen(req, conn)
			if stream != nil {
				d.connectStream(conn, r, stream, pipe, resp)
				return
			}
		case reqStreamHandler:
			resp = d.doStreamHandler(req)
		case reqRemoveStreamHandler:
			resp = d.doRemoveStreamHandler(req)
		case reqListPeers:
			resp = d.doListPeers()
		case reqDisconnect:
			resp = d.doDisconnect(req)
		case reqPersistentConnUpgrade:
			d.servePersistentConn(conn, r)
			return
		case reqDHT, reqConnManager, reqPubsub:
			resp = encodeErrorResponse(fmt.Sprintf("request type %d is not supported by this daemon", req.typ))
		default:
			resp = encodeErrorResponse(fmt.Sprintf("unknown request type %d", req.typ))
		}
		if err := writeDelimited(conn, resp); err != nil {
			log.Debugw("cannot write a control response", "error", err)
			_ = conn.Close()
			return
		}
	}
}

func (d *daemon) requestContext(timeoutSeconds int64) (context.Context, context.CancelFunc) {
	timeout := defaultRequestTimeout
	if timeoutSeconds > 0 {
		timeout = time.Duration(timeoutSeconds) * time.Second
	}
	return context.WithTimeout(d.ctx, timeout)
}

func missingParameters(name string) []byte {
	return encodeErrorResponse(fmt.Sprintf("Malformed request; missing parameters (%s)", name))
}

func (d *daemon) doIdentify() []byte {
	addrs := d.host.Addrs()
	encoded := make([][]byte, len(addrs))
	for i, a := range addrs {
		encoded[i] = a.Bytes()
	}
	return encodeIdentifyResponse([]byte(d.host.ID()), encoded)
}

// decodeRequestToPeer decodes a request that names a peer (CONNECT, DISCONNECT, STREAM_OPEN) and checks its peer id.
func decodeRequestToPeer(name string, b []byte, secondIsString bool) (*peerRequest, peer.ID, error) {
	r, err := decodePeerRequest(name, b, secondIsString)
	if err != nil {
		return nil, "", err
	}
	pid, err := peer.IDFromBytes(r.peer)
	if err != nil {
		return nil, "", fmt.Errorf("invalid peer id: %v", err)
	}
	return r, pid, nil
}

func (d *daemon) doConnect(req *request) []byte {
	if req.connect == nil {
		return missingParameters("connect")
	}
	r, pid, err := decodeRequestToPeer("ConnectRequest", req.connect, false)
	if err != nil {
		return encodeErrorResponse(err.Error())
	}
	info := peer.AddrInfo{ID: pid}
	for _, raw := range r.addrs {
		addr, err := ma.NewMultiaddrBytes(raw)
		if err != nil {
			return encodeErrorResponse(fmt.Sprintf("invalid multiaddr: %v", err))
		}
		info.Addrs = append(info.Addrs, addr)
	}
	ctx, cancel := d.requestContext(r.timeout)
	defer cancel()
	if err := d.host.Connect(ctx, info); err != nil {
		return encodeErrorResponse(err.Error())
	}
	return encodeOKResponse()
}

func (d *daemon) doDisconnect(req *request) []byte {
	if req.disconnect == nil {
		return missingParameters("disconnect")
	}
	_, pid, err := decodeRequestToPeer("DisconnectRequest", req.disconnect, false)
	if err != nil {
		return encodeErrorResponse(err.Error())
	}
	if err := d.host.Network().ClosePeer(pid); err != nil {
		return encodeErrorResponse(err.Error())
	}
	return encodeOKResponse()
}

// doListPeers returns one entry per connected peer with the remote addresses of all its connections.
func (d *daemon) doListPeers() []byte {
	var peers []peerInfo
	index := map[peer.ID]int{}
	for _, c := range d.host.Network().Conns() {
		id := c.RemotePeer()
		i, ok := index[id]
		if !ok {
			i = len(peers)
			index[id] = i
			peers = append(peers, peerInfo{id: []byte(id)})
		}
		peers[i].addrs = append(peers[i].addrs, c.RemoteMultiaddr().Bytes())
	}
	return encodeListPeersResponse(peers)
}

// streamInfoOf encodes the StreamInfo of s, with the offer of pipe when it is not nil.
func streamInfoOf(s network.Stream, pipe *shmPipeFile) []byte {
	conn := s.Conn()
	return encodeStreamInfo([]byte(conn.RemotePeer()), conn.RemoteMultiaddr().Bytes(), string(s.Protocol()), pipe)
}

// doStreamOpen opens the requested stream; with a stream it may return a shared-memory pipe offered in the answer.
func (d *daemon) doStreamOpen(req *request, conn net.Conn) ([]byte, network.Stream, *shmPipeFile) {
	if req.streamOpen == nil {
		return missingParameters("streamOpen"), nil, nil
	}
	r, pid, err := decodeRequestToPeer("StreamOpenRequest", req.streamOpen, true)
	if err != nil {
		return encodeErrorResponse(err.Error()), nil, nil
	}
	if len(r.protos) == 0 {
		return encodeErrorResponse("Malformed request; no protocol given"), nil, nil
	}
	protos := make([]protocol.ID, len(r.protos))
	for i, p := range r.protos {
		protos[i] = protocol.ID(p)
	}
	ctx, cancel := d.requestContext(r.timeout)
	defer cancel()
	s, err := d.host.NewStream(d.streamCtx(ctx), pid, protos...)
	if err != nil {
		return encodeErrorResponse(err.Error()), nil, nil
	}
	pipe := d.offerShmPipe(conn, r.shm)
	return encodeStreamInfoResponse(streamInfoOf(s, pipe)), s, pipe
}

// decodeHandlerRegistration decodes a (Remove)StreamHandlerRequest found in field `field` of a request and
// the client callback address it names. A non-nil errResp is the answer to a malformed request.
func decodeHandlerRegistration(field, message string, payload []byte) (*handlerRequest, ma.Multiaddr, []byte) {
	if payload == nil {
		return nil, nil, missingParameters(field)
	}
	r, err := decodeHandlerRequest(message, payload)
	if err != nil {
		return nil, nil, encodeErrorResponse(err.Error())
	}
	addr, err := parseHandlerAddr(r.addr)
	if err != nil {
		return nil, nil, encodeErrorResponse(fmt.Sprintf("invalid handler multiaddr: %v", err))
	}
	return r, addr, nil
}

func (d *daemon) doStreamHandler(req *request) []byte {
	r, addr, errResp := decodeHandlerRegistration("streamHandler", "StreamHandlerRequest", req.streamHandler)
	if errResp != nil {
		return errResp
	}
	key := string(addr.Bytes())
	if !r.balanced {
		d.pruneGoneStreamClients(r.protos) // a protocol held by a client that is gone is free again
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	// validate every protocol first, so that a failing request registers nothing
	for _, p := range r.protos {
		pid := protocol.ID(p)
		if _, unary := d.unaryHandlers[pid]; unary {
			return encodeErrorResponse(fmt.Sprintf("handler for protocol %s already set", p))
		}
		if handlers, ok := d.streamHandlers[pid]; ok && !r.balanced {
			return encodeErrorResponse(streamHolderError(p, handlers,
				"remove it there or stop that process first, or register it with balanced=True in both"))
		}
	}
	for _, p := range r.protos {
		addHandler(d, d.streamHandlers, protocol.ID(p), key, d.handleIncomingStream)
	}
	d.shmClients[key] = r.shm // the latest registration of a callback address says what its client understands
	return encodeOKResponse()
}

func (d *daemon) doRemoveStreamHandler(req *request) []byte {
	r, addr, errResp := decodeHandlerRegistration(
		"removeStreamHandler", "RemoveStreamHandlerRequest", req.removeStreamHandler)
	if errResp != nil {
		return errResp
	}
	key := string(addr.Bytes())
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, p := range r.protos {
		pid := protocol.ID(p)
		handlers, ok := d.streamHandlers[pid]
		if !ok {
			return encodeErrorResponse(fmt.Sprintf("handler for protocol %s does not exist", p))
		}
		if !handlers.remove(key) {
			return encodeErrorResponse(fmt.Sprintf("handler for protocol %s with maddr %s does not exist", p, addr))
		}
		dropIfUnused(d, d.streamHandlers, pid)
	}
	if !d.servesStreamsAt(key) {
		delete(d.shmClients, key)
	}
	return encodeOKResponse()
}

// parseHandlerAddr decodes a client's callback address. A unix socket path written without its leading slash
// (some multiaddr libraries drop it in the binary form) is taken as absolute, like its text form /unix/<path>.
func parseHandlerAddr(raw []byte) (ma.Multiaddr, error) {
	addr, err := ma.NewMultiaddrBytes(raw)
	if err != nil {
		return nil, err
	}
	path, err := addr.ValueForProtocol(ma.P_UNIX)
	if err != nil || strings.HasPrefix(path, "/") {
		return addr, nil
	}
	fixed, err := ma.NewComponent("unix", "/"+path)
	if err != nil {
		return addr, nil
	}
	return fixed, nil
}

// servesStreamsAt reports whether any stream handler still uses the client callback address key; callers hold d.mu.
func (d *daemon) servesStreamsAt(key string) bool {
	for _, handlers := range d.streamHandlers {
		for _, item := range handlers.items {
			if item == key {
				return true
			}
		}
	}
	return false
}
