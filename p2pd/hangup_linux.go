//go:build linux

package main

import (
	"net"

	"golang.org/x/sys/unix"
)

// pollShutdown reports, without waiting, how far the client at the other end of a unix socket shut it down: readEnded
// once it shut down its writing half or closed the socket (reads end with EOF after the bytes still queued), hungUp
// once the socket is shut down in both directions (the client closed it, or shut down its reading half, or both
// halves are shut down, one by each side). Other sockets report neither.
func pollShutdown(conn net.Conn) (readEnded, hungUp bool) {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return false, false
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return false, false
	}
	_ = raw.Control(func(fd uintptr) { readEnded, hungUp = pollFd(fd) })
	return readEnded, hungUp
}

func pollFd(fd uintptr) (readEnded, hungUp bool) {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLRDHUP}}
	n, err := unix.Poll(fds, 0)
	for err == unix.EINTR {
		n, err = unix.Poll(fds, 0)
	}
	if err != nil || n == 0 {
		return false, false
	}
	hungUp = fds[0].Revents&(unix.POLLHUP|unix.POLLERR) != 0
	return hungUp || fds[0].Revents&unix.POLLRDHUP != 0, hungUp
}

// awaitHangUp waits, after the client's end of a unix socket reported EOF, until the client closed the whole socket
// (or shut down its reading half), which a mere half-close (shutdown of its writing half) does not do. It returns
// true then; false when stop reports true at a wake-up, when conn is closed or its read deadline passes, and at
// once for sockets that cannot tell (not unix ones). Nothing else may read conn.
func awaitHangUp(conn net.Conn, stop func() bool) bool {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return false
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return false
	}
	hungUp := false
	err = raw.Read(func(fd uintptr) bool {
		_, hup := pollFd(fd)
		// stop is asked after the poll: a hang-up caused by our own shutdown follows a stop that reports true
		if stop() {
			return true
		}
		hungUp = hup
		return hup // false: wait until the socket is readable again (the netpoller reports hang-ups as such)
	})
	return err == nil && hungUp
}
