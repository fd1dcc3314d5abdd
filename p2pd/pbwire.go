package main

// Wire format of the p2pd control protocol (hivemind/proto/p2pd.proto, package p2pd.pb in the original daemon).
//
// The messages are encoded and decoded by hand with google.golang.org/protobuf/encoding/protowire instead of
// generated code: the daemon needs about fifteen small proto2 messages, hand-written codecs keep the build free of
// a protoc/protoc-gen-go step, and they let the daemon forward sub-messages as raw bytes (for example a
// CallUnaryResponse whose `response` is present but empty), so nothing a client sends is lost in re-encoding.
// Every required field of a message we emit is always written, because proto2 parsers (the Python client)
// reject messages that lack one.

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"google.golang.org/protobuf/encoding/protowire"
)

// Request.Type
const (
	reqIdentify              = 0
	reqConnect               = 1
	reqStreamOpen            = 2
	reqStreamHandler         = 3
	reqDHT                   = 4
	reqListPeers             = 5
	reqConnManager           = 6
	reqDisconnect            = 7
	reqPubsub                = 8
	reqPersistentConnUpgrade = 9
	reqRemoveStreamHandler   = 10
)

// Response.Type
const (
	respOK    = 0
	respError = 1
)

// oneof field numbers of PersistentConnectionRequest
const (
	pcReqAddUnaryHandler    = 2
	pcReqCallUnary          = 3
	pcReqUnaryResponse      = 4
	pcReqCancel             = 5
	pcReqRemoveUnaryHandler = 6
)

// oneof field numbers of PersistentConnectionResponse
const (
	pcRespCallUnaryResponse = 2
	pcRespRequestHandling   = 3
	pcRespDaemonError       = 4
	pcRespCancel            = 5
)

// ---------------------------------------------------------------------------------------------------------------
// framing: unsigned varint length prefix + message

// tooLargeError carries the announced size of a message that exceeded the read limit; the caller may discard it.
type tooLargeError struct {
	size  uint64
	limit int
}

func (e *tooLargeError) Error() string {
	return fmt.Sprintf("message of %d bytes exceeds the limit of %d bytes (-persistentConnMaxMsgSize)", e.size, e.limit)
}

// firstReadChunk is the buffer readDelimited starts with for a large message; it then doubles as bytes arrive.
const firstReadChunk = 32 << 10

// readDelimited reads one length-prefixed message of at most maxSize bytes. On a *tooLargeError the message
// body has not been consumed yet. The announced size is not trusted: the buffer grows as the body arrives, so
// memory held for a message is at most about twice what was received (plus firstReadChunk), whatever the size
// its sender announced.
func readDelimited(r *bufio.Reader, maxSize int) ([]byte, error) {
	return readDelimitedReserving(r, maxSize, nil)
}

// readDelimitedReserving is readDelimited that calls reserve (when not nil) with the number of bytes each
// growth of the buffer adds, before allocating them; an error from reserve aborts the read with that error.
func readDelimitedReserving(r *bufio.Reader, maxSize int, reserve func(int) error) ([]byte, error) {
	announced, err := binary.ReadUvarint(r)
	if err != nil {
		return nil, err
	}
	if announced > uint64(maxSize) {
		return nil, &tooLargeError{size: announced, limit: maxSize}
	}
	size := int(announced)
	buf := []byte{}
	for len(buf) < size {
		if len(buf) == cap(buf) {
			newCap := 2 * cap(buf)
			if newCap < firstReadChunk {
				newCap = firstReadChunk
			}
			if newCap > size {
				newCap = size
			}
			if reserve != nil {
				if err := reserve(newCap - cap(buf)); err != nil {
					return nil, err
				}
			}
			grown := make([]byte, len(buf), newCap)
			copy(grown, buf)
			buf = grown
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err != nil && len(buf) < size {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
	return buf, nil
}

// writeDelimited writes the length prefix and the message; small messages go out in one write.
func writeDelimited(w io.Writer, msg []byte) error {
	header := protowire.AppendVarint(make([]byte, 0, binary.MaxVarintLen64), uint64(len(msg)))
	if len(msg) < 64*1024 {
		_, err := w.Write(append(header, msg...))
		return err
	}
	if _, err := w.Write(header); err != nil {
		return err
	}
	_, err := w.Write(msg)
	return err
}

// ---------------------------------------------------------------------------------------------------------------
// generic decoding

type field struct {
	num   protowire.Number
	typ   protowire.Type
	value uint64 // varint and fixed fields
	bytes []byte // length-delimited fields
}

// decodeFields splits a message into its fields, in order; groups are rejected.
func decodeFields(b []byte) ([]field, error) {
	var fields []field
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, fmt.Errorf("malformed protobuf: %w", protowire.ParseError(n))
		}
		b = b[n:]
		f := field{num: num, typ: typ}
		switch typ {
		case protowire.VarintType:
			f.value, n = protowire.ConsumeVarint(b)
		case protowire.Fixed32Type:
			var v uint32
			v, n = protowire.ConsumeFixed32(b)
			f.value = uint64(v)
		case protowire.Fixed64Type:
			f.value, n = protowire.ConsumeFixed64(b)
		case protowire.BytesType:
			f.bytes, n = protowire.ConsumeBytes(b)
		default:
			return nil, fmt.Errorf("malformed protobuf: unsupported wire type %d in field %d", typ, num)
		}
		if n < 0 {
			return nil, fmt.Errorf("malformed protobuf: %w", protowire.ParseError(n))
		}
		b = b[n:]
		fields = append(fields, f)
	}
	return fields, nil
}

func wrongType(msg string, f field) error {
	return fmt.Errorf("malformed %s: field %d has wire type %d", msg, f.num, f.typ)
}

// ---------------------------------------------------------------------------------------------------------------
// Request (client -> daemon)

type request struct {
	typ                 int64
	connect             []byte
	streamOpen          []byte
	streamHandler       []byte
	disconnect          []byte
	removeStreamHandler []byte
}

func decodeRequest(b []byte) (*request, error) {
	fields, err := decodeFields(b)
	if err != nil {
		return nil, err
	}
	req := &request{typ: -1}
	for _, f := range fields {
		if f.num == 1 {
			if f.typ != protowire.VarintType {
				return nil, wrongType("Request", f)
			}
			req.typ = int64(f.value)
			continue
		}
		if f.typ != protowire.BytesType {
			continue // an unknown scalar field: skip it like any proto parser
		}
		switch f.num {
		case 2:
			req.connect = nonNil(f.bytes)
		case 3:
			req.streamOpen = nonNil(f.bytes)
		case 4:
			req.streamHandler = nonNil(f.bytes)
		case 7:
			req.disconnect = nonNil(f.bytes)
		case 9:
			req.removeStreamHandler = nonNil(f.bytes)
		}
	}
	if req.typ < 0 {
		return nil, errors.New("malformed Request: missing required field `type`")
	}
	return req, nil
}

// nonNil keeps "present but empty" distinguishable from "absent".
func nonNil(b []byte) []byte {
	if b == nil {
		return []byte{}
	}
	return b
}

// peerRequest covers ConnectRequest, StreamOpenRequest and DisconnectRequest (peer=1, addrs/proto=2, timeout=3).
type peerRequest struct {
	peer    []byte
	addrs   [][]byte // ConnectRequest.addrs
	protos  []string // StreamOpenRequest.proto
	timeout int64
	shm     bool // StreamOpenRequest.shm_capable (a hivemind extension, see shmpipe.go)
}

func decodePeerRequest(name string, b []byte, secondIsString bool) (*peerRequest, error) {
	fields, err := decodeFields(b)
	if err != nil {
		return nil, err
	}
	r := &peerRequest{}
	for _, f := range fields {
		switch f.num {
		case 1:
			if f.typ != protowire.BytesType {
				return nil, wrongType(name, f)
			}
			r.peer = f.bytes
		case 2:
			if f.typ != protowire.BytesType {
				return nil, wrongType(name, f)
			}
			if secondIsString {
				r.protos = append(r.protos, string(f.bytes))
			} else {
				r.addrs = append(r.addrs, f.bytes)
			}
		case 3:
			if f.typ != protowire.VarintType {
				return nil, wrongType(name, f)
			}
			r.timeout = int64(f.value)
		case fieldShmCapable:
			r.shm = f.typ == protowire.VarintType && f.value != 0
		}
	}
	return r, nil
}

// handlerRequest covers StreamHandlerRequest and RemoveStreamHandlerRequest (addr=1, proto=2, balanced=3).
type handlerRequest struct {
	addr     []byte
	protos   []string
	balanced bool
	shm      bool // StreamHandlerRequest.shm_capable (a hivemind extension, see shmpipe.go)
}

func decodeHandlerRequest(name string, b []byte) (*handlerRequest, error) {
	fields, err := decodeFields(b)
	if err != nil {
		return nil, err
	}
	r := &handlerRequest{}
	for _, f := range fields {
		switch f.num {
		case 1:
			if f.typ != protowire.BytesType {
				return nil, wrongType(name, f)
			}
			r.addr = f.bytes
		case 2:
			if f.typ != protowire.BytesType {
				return nil, wrongType(name, f)
			}
			r.protos = append(r.protos, string(f.bytes))
		case 3:
			if f.typ != protowire.VarintType {
				return nil, wrongType(name, f)
			}
			r.balanced = f.value != 0
		case fieldShmCapable:
			r.shm = f.typ == protowire.VarintType && f.value != 0
		}
	}
	return r, nil
}

// ---------------------------------------------------------------------------------------------------------------
// Response (daemon -> client)

func appendBytesField(b []byte, num protowire.Number, v []byte) []byte {
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendBytes(b, v)
}

func appendStringField(b []byte, num protowire.Number, v string) []byte {
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, v)
}

func appendVarintField(b []byte, num protowire.Number, v uint64) []byte {
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, v)
}

func encodeOKResponse() []byte {
	return appendVarintField(nil, 1, respOK)
}

func encodeErrorResponse(msg string) []byte {
	b := appendVarintField(nil, 1, respError)
	return appendBytesField(b, 2, appendStringField(nil, 1, msg))
}

// encodeStreamInfo encodes a StreamInfo; a non-nil pipe adds the shared-memory pipe offer (hivemind extension).
func encodeStreamInfo(peerID []byte, addr []byte, proto string, pipe *shmPipeFile) []byte {
	b := appendBytesField(nil, 1, peerID)
	b = appendBytesField(b, 2, addr)
	b = appendStringField(b, 3, proto)
	if pipe != nil {
		b = appendStringField(b, fieldShmPath, pipe.path)
		b = appendVarintField(b, fieldShmRingSize, uint64(pipe.ringSize))
	}
	return b
}

func encodeStreamInfoResponse(streamInfo []byte) []byte {
	return appendBytesField(encodeOKResponse(), 3, streamInfo)
}

func encodeIdentifyResponse(peerID []byte, addrs [][]byte) []byte {
	inner := appendBytesField(nil, 1, peerID)
	for _, a := range addrs {
		inner = appendBytesField(inner, 2, a)
	}
	return appendBytesField(encodeOKResponse(), 4, inner)
}

type peerInfo struct {
	id    []byte
	addrs [][]byte
}

func encodeListPeersResponse(peers []peerInfo) []byte {
	b := encodeOKResponse()
	for _, p := range peers {
		inner := appendBytesField(nil, 1, p.id)
		for _, a := range p.addrs {
			inner = appendBytesField(inner, 2, a)
		}
		b = appendBytesField(b, 6, inner)
	}
	return b
}
