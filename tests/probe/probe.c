/* probe: calls busybox has no applet for (file-system calls, UDP), run inside the test guest.
 * Built statically by tests/build.rs and copied into a share by the guest tests.
 * Each command prints one line: a result, or "errno:NAME". Exit code 0 unless misused. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>
#include <netinet/tcp.h>
#include <sys/stat.h>
#include <time.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>

static double now(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int tcp_connect(const char *host, int port) {
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((unsigned short)port) };
	if (inet_pton(AF_INET, host, &a.sin_addr) != 1) return -1;
	int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0) return -1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	if (connect(fd, (struct sockaddr *)&a, sizeof a)) { close(fd); return -1; }
	return fd;
}

/* A recursive A query for NAME (id 0x1234, no other records) written at q; its length. */
static size_t dns_query(unsigned char *q, const char *name) {
	size_t len = 0;
	q[len++] = 0x12; q[len++] = 0x34; q[len++] = 0x01; q[len++] = 0x00;
	q[len++] = 0; q[len++] = 1; memset(q + len, 0, 6); len += 6;
	for (const char *l = name; *l;) {
		const char *dot = strchr(l, '.');
		size_t n = dot ? (size_t)(dot - l) : strlen(l);
		q[len++] = (unsigned char)n; memcpy(q + len, l, n); len += n;
		l += n + (dot ? 1 : 0);
	}
	q[len++] = 0; q[len++] = 0; q[len++] = 1; q[len++] = 0; q[len++] = 1;
	return len;
}

/* ADDR:PORT as a socket address of ADDR's family (IPv6 when it has a colon); its length, or 0. */
static socklen_t addr_of(const char *host, int port, struct sockaddr_storage *ss) {
	memset(ss, 0, sizeof *ss);
	if (strchr(host, ':')) {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
		a->sin6_family = AF_INET6;
		a->sin6_port = htons((unsigned short)port);
		return inet_pton(AF_INET6, host, &a->sin6_addr) == 1 ? sizeof *a : 0;
	}
	struct sockaddr_in *a = (struct sockaddr_in *)ss;
	a->sin_family = AF_INET;
	a->sin_port = htons((unsigned short)port);
	return inet_pton(AF_INET, host, &a->sin_addr) == 1 ? sizeof *a : 0;
}

/* A socket of TYPE listening on PORT of every IPv4 and IPv6 address. */
static int bind_any(int type, int port) {
	struct sockaddr_in6 a = { .sin6_family = AF_INET6, .sin6_port = htons((unsigned short)port), .sin6_addr = IN6ADDR_ANY_INIT };
	int one = 1, zero = 0, fd = socket(AF_INET6, type, 0);
	if (fd < 0) return -1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
	if (bind(fd, (struct sockaddr *)&a, sizeof a)) { close(fd); return -1; }
	return fd;
}

/* "IP:PORT" of a peer (an IPv4 client of a dual-stack socket as plain IPv4, IPv6 as [IP]:PORT). */
static void peer_name(const struct sockaddr_in6 *from, char *out, size_t size) {
	char ip[INET6_ADDRSTRLEN];
	const unsigned char *b = from->sin6_addr.s6_addr;
	static const unsigned char mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };
	if (!memcmp(b, mapped, 12)) {
		inet_ntop(AF_INET, b + 12, ip, sizeof ip);
		snprintf(out, size, "%s:%d", ip, ntohs(from->sin6_port));
	} else {
		inet_ntop(AF_INET6, b, ip, sizeof ip);
		snprintf(out, size, "[%s]:%d", ip, ntohs(from->sin6_port));
	}
}

static int fail(void) {
	const char *n = strerrorname_np(errno);
	printf("errno:%s\n", n ? n : "?");
	return 0;
}

static int xopen(const char *p, int flags) {
	int fd = open(p, flags, 0644);
	if (fd < 0) { fail(); exit(0); }
	return fd;
}

/* Opens n non-blocking connections to addr:port at once into fds and waits (up to 60 s)
 * until every connect has ended; returns how many had not, or -1 on a bad address. pf is
 * n pollfds of scratch space. */
static int connect_all(const char *addr, int port, int n, int *fds, struct pollfd *pf) {
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((unsigned short)port) };
	if (inet_pton(AF_INET, addr, &a.sin_addr) != 1) return -1;
	for (int i = 0; i < n; i++) {
		fds[i] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
		if (fds[i] < 0) return -1;
		if (connect(fds[i], (struct sockaddr *)&a, sizeof a) && errno != EINPROGRESS) return -1;
	}
	int pending = n;
	for (int round = 0; pending > 0 && round < 600; round++) {
		pending = 0;
		for (int i = 0; i < n; i++) { pf[i].fd = fds[i]; pf[i].events = POLLOUT; pf[i].revents = 0; }
		poll(pf, (nfds_t)n, 100);
		for (int i = 0; i < n; i++) if (!(pf[i].revents & (POLLOUT | POLLERR | POLLHUP))) pending++;
	}
	return pending;
}

/* Another ICMP error that quoted tcpttl's SYN ("icmp TYPE/CODE from ADDR"), for its failure
 * line. */
static char other_icmp[80];

/* For tcpttl: reads the ICMP(v6) errors waiting on raw socket `raw` (after waiting up to
 * wait_ms for one) and prints "time-exceeded FROM" for the first time exceeded that quotes a
 * TCP segment from port `sport`; returns whether it did. */
static int raw_time_exceeded(int raw, int v6, unsigned short sport, int wait_ms) {
	struct pollfd r = { .fd = raw, .events = POLLIN };
	if (wait_ms && poll(&r, 1, wait_ms) <= 0) return 0;
	for (;;) {
		unsigned char b[1500];
		struct sockaddr_storage from;
		socklen_t fl = sizeof from;
		ssize_t n = recvfrom(raw, b, sizeof b, MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
		if (n <= 0) return 0;
		size_t at = v6 ? 0 : (size_t)(b[0] & 15) * 4;
		if ((size_t)n < at + 8) continue;
		const unsigned char *q = b + at + 8;
		size_t qh = v6 ? 40 : ((size_t)n > at + 8 ? (size_t)(q[0] & 15) * 4 : 0);
		if ((size_t)n < at + 8 + qh + 4 || q[v6 ? 6 : 9] != IPPROTO_TCP) continue;
		if (memcmp(q + qh, &sport, 2)) continue;
		char ip[INET6_ADDRSTRLEN];
		inet_ntop(from.ss_family, v6 ? (void *)&((struct sockaddr_in6 *)&from)->sin6_addr : (void *)&((struct sockaddr_in *)&from)->sin_addr, ip, sizeof ip);
		if (b[at] != (v6 ? 3 : 11)) {
			snprintf(other_icmp, sizeof other_icmp, "icmp %u/%u from %s", b[at], b[at + 1], ip);
			continue;
		}
		printf("time-exceeded %s\n", ip);
		return 1;
	}
}

int main(int argc, char **argv) {
	if (argc < 3) { fprintf(stderr, "usage: probe CMD PATH [ARGS]\n"); return 2; }
	const char *cmd = argv[1], *p = argv[2];
	if (!strcmp(cmd, "xattr-set") && argc == 5) {
		if (setxattr(p, argv[3], argv[4], strlen(argv[4]), 0)) return fail();
		puts("ok");
	} else if (!strcmp(cmd, "xattr-get") && argc == 4) {
		char buf[4096];
		ssize_t n = getxattr(p, argv[3], buf, sizeof buf - 1);
		if (n < 0) return fail();
		buf[n] = 0; puts(buf);
	} else if (!strcmp(cmd, "xattr-list")) {
		char buf[4096];
		ssize_t n = listxattr(p, buf, sizeof buf);
		if (n < 0) return fail();
		/* user.* names only, unless asked for all ("xattr-list PATH all"): a host may add
		 * labels of its own to the others. */
		int all = argc == 4 && !strcmp(argv[3], "all");
		for (ssize_t i = 0; i < n; i += strlen(buf + i) + 1)
			if (all || !strncmp(buf + i, "user.", 5)) printf("%s,", buf + i);
		puts("");
	} else if (!strcmp(cmd, "xattr-rm") && argc == 4) {
		if (removexattr(p, argv[3])) return fail();
		puts("ok");
	} else if (!strcmp(cmd, "rename2") && argc == 5) {
		unsigned flags = !strcmp(argv[4], "exchange") ? RENAME_EXCHANGE : RENAME_NOREPLACE;
		if (syscall(SYS_renameat2, AT_FDCWD, p, AT_FDCWD, argv[3], flags)) return fail();
		puts("ok");
	} else if (!strcmp(cmd, "seek") && argc == 5) {
		int fd = xopen(p, O_RDONLY);
		off_t r = lseek(fd, atoll(argv[4]), !strcmp(argv[3], "data") ? SEEK_DATA : SEEK_HOLE);
		if (r < 0) return fail();
		printf("%lld\n", (long long)r);
	} else if (!strcmp(cmd, "flock")) {
		/* Two open files: the second cannot take an exclusive lock the first holds. */
		int a = xopen(p, O_RDWR | O_CREAT), b = xopen(p, O_RDWR);
		if (flock(a, LOCK_EX | LOCK_NB)) return fail();
		if (!flock(b, LOCK_EX | LOCK_NB)) { puts("not-exclusive"); return 0; }
		if (errno != EWOULDBLOCK) return fail();
		flock(a, LOCK_UN);
		if (flock(b, LOCK_EX | LOCK_NB)) return fail();
		puts("exclusive");
	} else if (!strcmp(cmd, "lockwait")) {
		/* lockwait PATH: waits for an exclusive flock on PATH; prints "locked" or the error. */
		int fd = xopen(p, O_RDWR);
		if (flock(fd, LOCK_EX)) { printf("lockwait: %s\n", strerror(errno)); return 1; }
		puts("locked");
	} else if (!strcmp(cmd, "fcntl")) {
		/* The parent write-locks bytes 0-99; a child sees the lock (F_GETLK) and cannot take it
		 * (F_SETLK), then takes it with F_SETLKW once the parent unlocks. */
		int fd = xopen(p, O_RDWR | O_CREAT);
		struct flock l = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 100 };
		if (fcntl(fd, F_SETLK, &l)) return fail();
		int pipefd[2];
		if (pipe(pipefd)) return fail();
		pid_t c = fork();
		if (c == 0) {
			int cfd = xopen(p, O_RDWR);
			struct flock q = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 10, .l_len = 1 };
			if (fcntl(cfd, F_GETLK, &q)) { fail(); _exit(1); }
			int seen = q.l_type == F_WRLCK && q.l_pid == getppid();
			q.l_type = F_WRLCK; q.l_start = 10; q.l_len = 1;
			int refused = fcntl(cfd, F_SETLK, &q) < 0 && (errno == EAGAIN || errno == EACCES);
			if (write(pipefd[1], "x", 1) != 1) _exit(1);
			int waited = fcntl(cfd, F_SETLKW, &q) == 0;
			printf("getlk=%d setlk-refused=%d setlkw=%d\n", seen, refused, waited);
			fflush(stdout);
			_exit(0);
		}
		char ch;
		if (read(pipefd[0], &ch, 1) != 1) return fail();
		usleep(200000);
		l.l_type = F_UNLCK;
		if (fcntl(fd, F_SETLK, &l)) return fail();
		int st;
		waitpid(c, &st, 0);
	} else if (!strcmp(cmd, "udp") && argc == 5) {
		/* udp ADDR PORT SIZE: send one SIZE-byte datagram, wait up to 3 s for the echo, print
		 * "SIZE-BACK SAME|DIFFERENT" or errno (EMSGSIZE with the path MTU learned). */
		size_t size = (size_t)atol(argv[4]);
		struct sockaddr_storage a;
		socklen_t alen = addr_of(p, atoi(argv[3]), &a);
		if (!alen) { errno = EINVAL; return fail(); }
		int s = socket(a.ss_family, SOCK_DGRAM, 0);
		if (s < 0) return fail();
		if (connect(s, (struct sockaddr *)&a, alen)) return fail();
		unsigned char *out = malloc(size ? size : 1), *in = malloc(65536);
		for (size_t i = 0; i < size; i++) out[i] = (unsigned char)(i * 7 + 3);
		if (send(s, out, size, 0) < 0) return fail();
		struct pollfd pf = { .fd = s, .events = POLLIN };
		if (poll(&pf, 1, 3000) != 1) { puts("timeout"); return 0; }
		ssize_t n = recv(s, in, 65536, 0);
		if (n < 0 && errno == EMSGSIZE) {
			/* Too big for the path: what the socket learned of its MTU. */
			int v6 = a.ss_family == AF_INET6, mtu = 0;
			socklen_t ml = sizeof mtu;
			getsockopt(s, v6 ? IPPROTO_IPV6 : IPPROTO_IP, v6 ? IPV6_MTU : IP_MTU, &mtu, &ml);
			printf("errno:EMSGSIZE mtu %d\n", mtu);
			return 0;
		}
		if (n < 0) return fail();
		printf("%zd %s\n", n, (size_t)n == size && !memcmp(in, out, size) ? "SAME" : "DIFFERENT");
	} else if (!strcmp(cmd, "udpfrom") && argc >= 5) {
		/* udpfrom ADDR PORT SRC...: one datagram naming its source to an echo server from
		 * each local address SRC, all sent before any echo is read (a late echo server
		 * answers after all); print "GOT of N", the sockets that had their own echo within
		 * 3 s. A guest that uses several addresses at once needs each reply at its own. */
		int n = argc - 4, got = 0, fds[8];
		if (n > 8) { errno = E2BIG; return fail(); }
		for (int i = 0; i < n; i++) {
			struct sockaddr_storage src, dst;
			socklen_t slen = addr_of(argv[4 + i], 0, &src), dlen = addr_of(p, atoi(argv[3]), &dst);
			if (!slen || !dlen) { errno = EINVAL; return fail(); }
			fds[i] = socket(dst.ss_family, SOCK_DGRAM, 0);
			if (fds[i] < 0 || bind(fds[i], (struct sockaddr *)&src, slen)) return fail();
			if (connect(fds[i], (struct sockaddr *)&dst, dlen)) return fail();
			if (send(fds[i], argv[4 + i], strlen(argv[4 + i]), 0) < 0) return fail();
		}
		double end = now() + 3;
		int done[8] = {0};
		while (got < n && now() < end) {
			struct pollfd pf[8];
			for (int i = 0; i < n; i++) pf[i] = (struct pollfd){ .fd = fds[i], .events = POLLIN };
			if (poll(pf, (nfds_t)n, 100) <= 0) continue;
			for (int i = 0; i < n; i++) {
				char buf[128];
				if (!(pf[i].revents & POLLIN)) continue;
				ssize_t r = recv(fds[i], buf, sizeof buf - 1, 0);
				if (r < 0) continue;
				buf[r] = 0;
				if (!done[i] && !strcmp(buf, argv[4 + i])) { done[i] = 1; got++; }
			}
		}
		printf("%d of %d\n", got, n);
	} else if (!strcmp(cmd, "tcpcsum") && argc == 4) {
		/* tcpcsum ADDR PORT: connects to ADDR:PORT (IPv4) while a packet socket watches, and
		 * checks the SYN-ACK's TCP checksum as a kernel that sends the segment on would see
		 * it: one the device left partial (TP_STATUS_CSUMNOTREADY) is finished first, as
		 * skb_checksum_help does. Prints "ok", "bad" or "timeout". */
		int ps = socket(AF_PACKET, SOCK_DGRAM, htons(ETH_P_IP)), one = 1;
		if (ps < 0 || setsockopt(ps, SOL_PACKET, PACKET_AUXDATA, &one, sizeof one)) return fail();
		struct sockaddr_in dst = { .sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[3])) };
		if (inet_pton(AF_INET, p, &dst.sin_addr) != 1) { errno = EINVAL; return fail(); }
		int c = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
		if (c < 0 || (connect(c, (struct sockaddr *)&dst, sizeof dst) && errno != EINPROGRESS)) return fail();
		double end = now() + 5;
		const char *result = "timeout";
		while (now() < end) {
			struct pollfd pf = { .fd = ps, .events = POLLIN };
			if (poll(&pf, 1, 100) <= 0) continue;
			unsigned char b[2048];
			char ctl[CMSG_SPACE(sizeof(struct tpacket_auxdata))];
			struct iovec iov = { b, sizeof b };
			struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof ctl };
			ssize_t n = recvmsg(ps, &mh, MSG_TRUNC);
			if (n < 40 || n > (ssize_t)sizeof b) continue;
			unsigned status = 0;
			for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
				if (cm->cmsg_level == SOL_PACKET && cm->cmsg_type == PACKET_AUXDATA)
					status = ((struct tpacket_auxdata *)CMSG_DATA(cm))->tp_status;
			/* SOCK_DGRAM: b holds the IP packet. */
			size_t ihl = (size_t)(b[0] & 15) * 4, total = (size_t)b[2] << 8 | b[3];
			if (b[9] != 6 || total > (size_t)n || total < ihl + 20) continue;
			unsigned char *t = b + ihl;
			size_t tlen = total - ihl;
			if (memcmp(b + 12, &dst.sin_addr, 4) || memcmp(t, &dst.sin_port, 2) || (t[13] & 0x12) != 0x12) continue;
			unsigned long sum = 0;
			if (status & TP_STATUS_CSUMNOTREADY) {
				for (size_t i = 0; i < tlen; i += 2) sum += (unsigned)t[i] << 8 | (i + 1 < tlen ? t[i + 1] : 0);
				while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
				t[16] = (unsigned char)(~sum >> 8); t[17] = (unsigned char)~sum;
				sum = 0;
			}
			for (int i = 12; i < 20; i += 2) sum += (unsigned)b[i] << 8 | b[i + 1];
			sum += 6 + tlen;
			for (size_t i = 0; i < tlen; i += 2) sum += (unsigned)t[i] << 8 | (i + 1 < tlen ? t[i + 1] : 0);
			while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
			result = sum == 0xffff ? "ok" : "bad";
			break;
		}
		puts(result);
	} else if (!strcmp(cmd, "dhcp") && argc == 5) {
		/* dhcp IFACE SERVER request|inform: what a bound DHCP client sends from its address,
		 * as systemd-networkd and dhcpcd do: a REQUEST renewing its lease, or an INFORM
		 * asking for the rest of the plan, unicast to SERVER:67 from a UDP socket bound to
		 * the interface's address, port 68, with ciaddr set. Prints "ack YIADDR" or "nak"
		 * for an answer that reaches that socket within 3 s, or "timeout". */
		struct ifreq ifr = {0};
		strncpy(ifr.ifr_name, p, IFNAMSIZ - 1);
		int s = socket(AF_INET, SOCK_DGRAM, 0), one = 1;
		if (s < 0 || ioctl(s, SIOCGIFADDR, &ifr)) return fail();
		struct in_addr me = ((struct sockaddr_in *)&ifr.ifr_addr)->sin_addr;
		if (ioctl(s, SIOCGIFHWADDR, &ifr)) return fail();
		setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
		struct sockaddr_in b = { .sin_family = AF_INET, .sin_port = htons(68), .sin_addr = me };
		struct sockaddr_in srv = { .sin_family = AF_INET, .sin_port = htons(67) };
		if (inet_pton(AF_INET, argv[3], &srv.sin_addr) != 1) { errno = EINVAL; return fail(); }
		if (bind(s, (struct sockaddr *)&b, sizeof b)) return fail();
		unsigned char m[300] = { 1, 1, 6, 0, 'F', 'e', 'r', 'y' };
		memcpy(m + 12, &me, 4);                      /* ciaddr */
		memcpy(m + 28, ifr.ifr_hwaddr.sa_data, 6);   /* chaddr */
		memcpy(m + 236, "\x63\x82\x53\x63", 4);      /* the magic cookie */
		unsigned char opts[] = { 53, 1, !strcmp(argv[4], "inform") ? 8 : 3, 255 };
		memcpy(m + 240, opts, sizeof opts);
		if (sendto(s, m, sizeof m, 0, (struct sockaddr *)&srv, sizeof srv) < 0) return fail();
		double end = now() + 3;
		const char *result = "timeout";
		char line[64];
		while (now() < end) {
			struct pollfd pf = { .fd = s, .events = POLLIN };
			unsigned char r[1500];
			if (poll(&pf, 1, 100) <= 0) continue;
			ssize_t n = recv(s, r, sizeof r, 0);
			if (n < 244 || r[0] != 2 || memcmp(r + 4, m + 4, 4)) continue;
			int type = 0;
			for (ssize_t i = 240; i + 2 < n && r[i] != 255; i += r[i] ? 2 + r[i + 1] : 1)
				if (r[i] == 53) type = r[i + 2];
			if (type == 6) { result = "nak"; break; }
			if (type != 5) continue;
			char a[INET_ADDRSTRLEN];
			inet_ntop(AF_INET, r + 16, a, sizeof a);
			snprintf(line, sizeof line, "ack %s", a);
			result = line;
			break;
		}
		puts(result);
	} else if (!strcmp(cmd, "pingttl") && argc == 4) {
		/* One echo request to ADDR with TTL (hop limit) N, from a raw socket: prints
		 * "reply FROM" or "time-exceeded FROM" (the ICMP error quoting it), or "timeout". */
		struct sockaddr_storage ss, from;
		if (!addr_of(argv[2], 0, &ss)) return 2;
		int v6 = ss.ss_family == AF_INET6, ttl = atoi(argv[3]);
		int fd = socket(ss.ss_family, SOCK_RAW, v6 ? IPPROTO_ICMPV6 : IPPROTO_ICMP);
		if (fd < 0) return fail();
		setsockopt(fd, v6 ? IPPROTO_IPV6 : IPPROTO_IP, v6 ? IPV6_UNICAST_HOPS : IP_TTL, &ttl, sizeof ttl);
		unsigned char req[16] = { v6 ? 128 : 8, 0, 0, 0, 0x4f, 0x52, 0, 1, 'f', 'e', 'r', 'r', 'y', 't', 't', 'l' };
		if (!v6) { /* ICMPv6's checksum is the kernel's */
			unsigned sum = 0;
			for (int i = 0; i < 16; i += 2) sum += (unsigned)(req[i] << 8 | req[i + 1]);
			while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
			req[2] = (unsigned char)(~sum >> 8); req[3] = (unsigned char)~sum;
		}
		if (sendto(fd, req, sizeof req, 0, (struct sockaddr *)&ss, v6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in)) < 0) return fail();
		double end = now() + 3;
		while (now() < end) {
			struct pollfd p = { .fd = fd, .events = POLLIN };
			if (poll(&p, 1, 100) <= 0) continue;
			unsigned char b[1500];
			socklen_t fl = sizeof from;
			ssize_t n = recvfrom(fd, b, sizeof b, 0, (struct sockaddr *)&from, &fl);
			if (n <= 0) continue;
			/* IPv4 raw sockets see the IP header; the message (and a quote's echo header) follow. */
			size_t at = v6 ? 0 : (size_t)(b[0] & 15) * 4;
			if ((size_t)n < at + 8) continue;
			const unsigned char *m = b + at, *q;
			const char *what;
			if (m[0] == (v6 ? 129 : 0)) { what = "reply"; q = m; }
			else if (m[0] == (v6 ? 3 : 11)) {
				what = "time-exceeded";
				size_t qh = v6 ? 40 : ((size_t)n >= at + 9 ? (size_t)(m[8] & 15) * 4 : 0);
				if ((size_t)n < at + 8 + qh + 8) continue;
				q = m + 8 + qh;
			} else continue;
			if (q[4] != 0x4f || q[5] != 0x52) continue;
			char ip[INET6_ADDRSTRLEN];
			inet_ntop(from.ss_family, v6 ? (void *)&((struct sockaddr_in6 *)&from)->sin6_addr : (void *)&((struct sockaddr_in *)&from)->sin_addr, ip, sizeof ip);
			printf("%s %s\n", what, ip);
			return 0;
		}
		printf("timeout\n");
	} else if (!strcmp(cmd, "tcpttl") && argc == 5) {
		/* tcpttl ADDR PORT N: a TCP connect to ADDR:PORT whose SYN has TTL (hop limit) N, as
		 * tcptraceroute sends: prints "time-exceeded FROM" for an ICMP error quoting the SYN
		 * (read on a raw socket), else how the connect ended ("connected" or "errno:NAME"),
		 * or "timeout" after 3 s. */
		struct sockaddr_storage ss;
		socklen_t sl = addr_of(p, atoi(argv[3]), &ss);
		if (!sl) return 2;
		int v6 = ss.ss_family == AF_INET6, ttl = atoi(argv[4]);
		int raw = socket(ss.ss_family, SOCK_RAW, v6 ? IPPROTO_ICMPV6 : IPPROTO_ICMP);
		int c = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
		if (raw < 0 || c < 0) return fail();
		setsockopt(c, v6 ? IPPROTO_IPV6 : IPPROTO_IP, v6 ? IPV6_UNICAST_HOPS : IP_TTL, &ttl, sizeof ttl);
		if (connect(c, (struct sockaddr *)&ss, sl) && errno != EINPROGRESS) return fail();
		struct sockaddr_storage me;
		socklen_t ml = sizeof me;
		getsockname(c, (struct sockaddr *)&me, &ml);
		unsigned short sport = v6 ? ((struct sockaddr_in6 *)&me)->sin6_port : ((struct sockaddr_in *)&me)->sin_port;
		double end = now() + 3;
		while (now() < end) {
			struct pollfd pf[2] = { { .fd = raw, .events = POLLIN }, { .fd = c, .events = POLLOUT } };
			if (poll(pf, 2, 100) <= 0) continue;
			if ((pf[0].revents & POLLIN) && raw_time_exceeded(raw, v6, sport, 0)) return 0;
			if (pf[1].revents) {
				int err = 0;
				socklen_t el = sizeof err;
				getsockopt(c, SOL_SOCKET, SO_ERROR, &err, &el);
				if (!err) { puts("connected"); return 0; }
				/* A time exceeded ends the connect too (EHOSTUNREACH), and the same ICMP
				 * error reaches the raw socket; with the guest's two CPUs, poll may have
				 * looked at the raw socket just before it arrived. Look again. */
				if (raw_time_exceeded(raw, v6, sport, 200)) return 0;
				const char *n = strerrorname_np(err);
				if (other_icmp[0]) printf("errno:%s (%s)\n", n ? n : "?", other_icmp);
				else printf("errno:%s\n", n ? n : "?");
				return 0;
			}
		}
		puts("timeout");
	} else if (!strcmp(cmd, "udpburst") && argc == 5) {
		/* udpburst ADDR PORT COUNT: send COUNT 64-byte datagrams back to back to an echo
		 * server, then collect echoes until 3 s pass without one; print "GOT of COUNT". */
		int count = atoi(argv[4]), got = 0;
		int s = socket(AF_INET, SOCK_DGRAM, 0);
		struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[3])) };
		if (s < 0 || inet_pton(AF_INET, p, &a.sin_addr) != 1) return fail();
		if (connect(s, (struct sockaddr *)&a, sizeof a)) return fail();
		/* Room for every echo before the first is read (the guest runs as root). */
		int rcv = 8 << 20;
		if (setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &rcv, sizeof rcv)) return fail();
		unsigned char buf[64];
		for (int i = 0; i < count; i++) {
			memset(buf, i & 0xff, sizeof buf);
			if (send(s, buf, sizeof buf, 0) < 0) return fail();
		}
		struct pollfd pf = { .fd = s, .events = POLLIN };
		while (got < count && poll(&pf, 1, 3000) == 1)
			if (recv(s, buf, sizeof buf, 0) == (ssize_t)sizeof buf) got++;
		printf("%d of %d\n", got, count);
	} else if (!strcmp(cmd, "dnsudp") && argc == 4) {
		/* dnsudp SERVER NAME: an A query over UDP offering EDNS0 answers of up to 4,096 bytes,
		 * as modern resolvers do; prints "ANSWERS BYTES" of the reply, or timeout. */
		unsigned char q[512], *r = malloc(65536);
		size_t len = dns_query(q, argv[3]);
		q[11] = 1; /* one additional record: the OPT */
		/* OPT: root name, type 41, class = UDP size 4096, TTL 0, no data (RFC 6891). */
		const unsigned char opt[] = { 0, 0, 41, 0x10, 0x00, 0, 0, 0, 0, 0, 0 };
		memcpy(q + len, opt, sizeof opt); len += sizeof opt;
		int s = socket(AF_INET, SOCK_DGRAM, 0);
		struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(53) };
		if (s < 0 || inet_pton(AF_INET, p, &a.sin_addr) != 1) return fail();
		if (connect(s, (struct sockaddr *)&a, sizeof a)) return fail();
		if (send(s, q, len, 0) < 0) return fail();
		struct pollfd pf = { .fd = s, .events = POLLIN };
		if (poll(&pf, 1, 3000) != 1) { puts("timeout"); return 0; }
		ssize_t n = recv(s, r, 65536, 0);
		if (n < 0) return fail();
		if (n < 12) { puts("short"); return 0; }
		printf("%d %zd\n", (r[6] << 8) | r[7], n);
	} else if (!strcmp(cmd, "dnstcp") && argc == 4) {
		/* dnstcp SERVER NAME: an A query over TCP; prints the first address, or rcode:N. */
		unsigned char q[512], r[4096];
		size_t len = 2 + dns_query(q + 2, argv[3]);
		q[0] = (unsigned char)((len - 2) >> 8); q[1] = (unsigned char)(len - 2);
		int s = socket(AF_INET, SOCK_STREAM, 0);
		struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(53) };
		if (s < 0 || inet_pton(AF_INET, p, &a.sin_addr) != 1) return fail();
		if (connect(s, (struct sockaddr *)&a, sizeof a)) return fail();
		if (write(s, q, len) != (ssize_t)len) return fail();
		size_t got = 0;
		while (got < 2 || got < 2 + (size_t)((r[0] << 8) | r[1])) {
			ssize_t n = read(s, r + got, sizeof r - got);
			if (n <= 0) break;
			got += (size_t)n;
		}
		if (got < 14) { puts("short"); return 0; }
		unsigned char *m = r + 2;
		int rcode = m[3] & 15, an = (m[6] << 8) | m[7];
		if (rcode || !an) { printf("rcode:%d\n", rcode); return 0; }
		/* The answer ends with the A record's 4 address bytes. */
		size_t end = 2 + (size_t)((r[0] << 8) | r[1]);
		printf("%d.%d.%d.%d\n", r[end - 4], r[end - 3], r[end - 2], r[end - 1]);
	} else if (!strcmp(cmd, "tcpmany") && argc == 5) {
		/* tcpmany ADDR PORT N: N connections open at once to an echo server; each sends one
		 * byte and reads it back. Prints "OK of N". */
		int n = atoi(argv[4]), ok = 0;
		int *fds = calloc((size_t)n, sizeof *fds);
		struct pollfd *pf = calloc((size_t)n, sizeof *pf);
		/* Every connect ended, then a byte on each. */
		if (!fds || !pf || connect_all(p, atoi(argv[3]), n, fds, pf) < 0) return fail();
		for (int i = 0; i < n; i++) (void)!write(fds[i], "x", 1);
		char c;
		int got[65536] = {0};
		for (int round = 0; round < 600 && ok < n; round++) {
			for (int i = 0; i < n; i++) { pf[i].fd = got[i] ? -1 : fds[i]; pf[i].events = POLLIN; pf[i].revents = 0; }
			poll(pf, (nfds_t)n, 100);
			for (int i = 0; i < n; i++)
				if (!got[i] && (pf[i].revents & POLLIN) && read(fds[i], &c, 1) == 1 && c == 'x') { got[i] = 1; ok++; }
		}
		for (int i = 0; i < n; i++) close(fds[i]);
		printf("%d of %d\n", ok, n);
	} else if (!strcmp(cmd, "tunnels") && argc == 6) {
		/* tunnels PROXY PORT TARGET N: N CONNECT tunnels to TARGET (an echo server) open at
		 * once through the proxy at PROXY:PORT; each must answer 200, then carry one byte
		 * there and back while all are open. Prints "OK of N". */
		int n = atoi(argv[5]), ok = 0, up = 0;
		int *fds = calloc((size_t)n, sizeof *fds);
		int *state = calloc((size_t)n, sizeof *state); /* 0 connecting, 1 answered, 2 echoed */
		struct pollfd *pf = calloc((size_t)n, sizeof *pf);
		char req[512];
		int rl = snprintf(req, sizeof req, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", argv[4], argv[4]);
		if (!fds || !state || !pf) return fail();
		int pending = connect_all(p, atoi(argv[3]), n, fds, pf);
		if (pending < 0) return fail();
		/* Each CONNECT goes once its connection is up (a connect still under way takes no
		 * write); then the answers: a head that starts "HTTP/1.1 200" and ends with a blank
		 * line. */
		char buf[256];
		int *seen = calloc((size_t)n, sizeof *seen);
		int *sent = calloc((size_t)n, sizeof *sent);
		if (!seen || !sent) return fail();
		for (int round = 0; round < 1200 && up < n; round++) {
			for (int i = 0; i < n; i++) { pf[i].fd = state[i] ? -1 : fds[i]; pf[i].events = sent[i] ? POLLIN : POLLOUT; pf[i].revents = 0; }
			poll(pf, (nfds_t)n, 100);
			for (int i = 0; i < n; i++) {
				if (!state[i] && !sent[i] && (pf[i].revents & POLLOUT)) {
					sent[i] = write(fds[i], req, (size_t)rl) == rl;
					if (!sent[i]) state[i] = -1;
					continue;
				}
				if (state[i] || !(pf[i].revents & POLLIN)) continue;
				ssize_t r = read(fds[i], buf, sizeof buf);
				if (r <= 0) { state[i] = -1; continue; }
				if (seen[i] == 0 && (r < 12 || memcmp(buf, "HTTP/1.1 200", 12))) { state[i] = -1; continue; }
				seen[i] += (int)r;
				if (r >= 4 && !memcmp(buf + r - 4, "\r\n\r\n", 4)) { state[i] = 1; up++; }
			}
		}
		fprintf(stderr, "tunnels: %d connects unfinished, %d answered\n", pending, up);
		for (int i = 0; i < n; i++) if (state[i] == 1) (void)!write(fds[i], "x", 1);
		for (int round = 0; round < 600 && ok < up; round++) {
			for (int i = 0; i < n; i++) { pf[i].fd = state[i] == 1 ? fds[i] : -1; pf[i].events = POLLIN; pf[i].revents = 0; }
			poll(pf, (nfds_t)n, 100);
			for (int i = 0; i < n; i++)
				if (state[i] == 1 && (pf[i].revents & POLLIN) && read(fds[i], buf, 1) == 1 && buf[0] == 'x') { state[i] = 2; ok++; }
		}
		for (int i = 0; i < n; i++) close(fds[i]);
		printf("%d of %d\n", ok, n);
	} else if (!strcmp(cmd, "write-as") && argc == 4) {
		/* write-as PATH UID: appends one byte to PATH as UID (without CAP_FSETID). */
		if (setgid((gid_t)atoi(argv[3])) || setuid((uid_t)atoi(argv[3]))) return fail();
		int fd = open(p, O_WRONLY | O_APPEND);
		if (fd < 0 || write(fd, "w", 1) != 1) return fail();
		close(fd);
		puts("ok");
	} else if (!strcmp(cmd, "now")) {
		/* now -: monotonic seconds, for timing shell steps. */
		printf("%.6f\n", now());
	} else if (!strcmp(cmd, "tcpecho")) {
		/* tcpecho PORT: echoes each connection's bytes back, one connection after another
		 * (the host side of the rr and crr benchmarks). */
		struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(p)) };
		int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
		if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, 1024)) return fail();
		puts("ready");
		fflush(stdout);
		for (;;) {
			int c = accept(fd, NULL, NULL);
			if (c < 0) continue;
			setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
			char buf[4096];
			ssize_t n;
			while ((n = read(c, buf, sizeof buf)) > 0) (void)!write(c, buf, (size_t)n);
			close(c);
		}
	} else if (!strcmp(cmd, "fetch") && (argc == 4 || argc == 6)) {
		/* fetch ADDR PORT [PROXY PROXYPORT]: sends a request line to ADDR:PORT (straight, or
		 * through a CONNECT tunnel of the proxy) and reads the answer to its end. Prints
		 * "BYTES SECONDS" (the proxy benchmark's client; blobserve is its server). */
		double t0 = now();
		int fd = argc == 6 ? tcp_connect(argv[4], atoi(argv[5])) : tcp_connect(p, atoi(argv[3]));
		if (fd < 0) return fail();
		static char buf[1 << 16];
		if (argc == 6) {
			int n = snprintf(buf, sizeof buf, "CONNECT %s:%s HTTP/1.1\r\nHost: %s:%s\r\n\r\n", p, argv[3], p, argv[3]);
			if (write(fd, buf, (size_t)n) != n) return fail();
			/* The proxy's answer: up to its blank line, a byte at a time (it is short). */
			char head[1024];
			size_t got = 0;
			while (got < sizeof head - 1 && (got < 4 || memcmp(head + got - 4, "\r\n\r\n", 4))) {
				if (read(fd, head + got, 1) != 1) return fail();
				got++;
			}
			head[got] = 0;
			if (strncmp(head, "HTTP/1.1 200", 12)) { printf("refused: %.40s\n", head); return 0; }
		}
		const char *req = "GET / HTTP/1.0\r\n\r\n";
		if (write(fd, req, strlen(req)) != (ssize_t)strlen(req)) return fail();
		long long total = 0;
		ssize_t r;
		while ((r = read(fd, buf, sizeof buf)) > 0) total += r;
		printf("%lld %.6f\n", total, now() - t0);
	} else if (!strcmp(cmd, "blobserve") && argc == 4) {
		/* blobserve PORT MIB: sends each connection MIB MiB of zeros, after reading what it
		 * sent first (a request line, which it ignores), then closes; one connection after
		 * another (the host side of the proxy benchmark; curl takes it as HTTP/0.9). */
		struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(p)) };
		long mib = atol(argv[3]);
		int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
		if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, 64)) return fail();
		static char chunk[1 << 20];
		puts("ready");
		fflush(stdout);
		for (;;) {
			int c = accept(fd, NULL, NULL);
			if (c < 0) continue;
			char req[4096];
			(void)!read(c, req, sizeof req);
			for (long i = 0; i < mib; i++)
				if (write(c, chunk, sizeof chunk) != (ssize_t)sizeof chunk) break;
			close(c);
		}
	} else if (!strcmp(cmd, "rr") && argc == 5) {
		/* rr HOST PORT SECONDS: 1-byte request/response on one connection to an echo server.
		 * Prints "rr TRANSACTIONS MICROSECONDS_PER_TRANSACTION". */
		int fd = tcp_connect(p, atoi(argv[3]));
		if (fd < 0) return fail();
		double end = now() + atof(argv[4]), t0 = now();
		long n = 0;
		char c = 'x';
		while (now() < end) {
			if (write(fd, &c, 1) != 1 || read(fd, &c, 1) != 1) return fail();
			n++;
		}
		printf("rr %ld %.1f\n", n, (now() - t0) * 1e6 / (double)(n ? n : 1));
	} else if (!strcmp(cmd, "crr") && argc == 5) {
		/* crr HOST PORT SECONDS: connect, 1-byte request/response, close, again. Prints
		 * "crr CONNECTIONS PER_SECOND". */
		double end = now() + atof(argv[4]), t0 = now();
		long n = 0;
		char c = 'x';
		while (now() < end) {
			int fd = tcp_connect(p, atoi(argv[3]));
			if (fd < 0) return fail();
			if (write(fd, &c, 1) != 1 || read(fd, &c, 1) != 1) return fail();
			close(fd);
			n++;
		}
		printf("crr %ld %.1f\n", n, (double)n / (now() - t0));
	} else if (!strcmp(cmd, "files") && argc == 4) {
		/* files DIR N: creates N 100-byte files, stats each, unlinks each. Prints
		 * "files N CREATE_S STAT_S UNLINK_S". */
		int n = atoi(argv[3]);
		char name[4096], data[100];
		memset(data, 'f', sizeof data);
		double t0 = now();
		for (int i = 0; i < n; i++) {
			snprintf(name, sizeof name, "%s/f%06d", p, i);
			int fd = open(name, O_CREAT | O_WRONLY | O_TRUNC, 0644);
			if (fd < 0 || write(fd, data, sizeof data) != (ssize_t)sizeof data) return fail();
			close(fd);
		}
		double t1 = now();
		struct stat st;
		for (int i = 0; i < n; i++) {
			snprintf(name, sizeof name, "%s/f%06d", p, i);
			if (stat(name, &st)) return fail();
		}
		double t2 = now();
		for (int i = 0; i < n; i++) {
			snprintf(name, sizeof name, "%s/f%06d", p, i);
			if (unlink(name)) return fail();
		}
		printf("files %d %.3f %.3f %.3f\n", n, t1 - t0, t2 - t1, now() - t2);
	} else if (!strcmp(cmd, "udpecho")) {
		/* udpecho PORT: echoes every datagram to its sender, forever. */
		int fd = bind_any(SOCK_DGRAM, atoi(p));
		if (fd < 0) return fail();
		static char buf[65536];
		for (;;) {
			struct sockaddr_in6 from;
			socklen_t fl = sizeof from;
			ssize_t n = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &fl);
			if (n >= 0) sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&from, fl);
		}
	} else if (!strcmp(cmd, "connect") && argc == 5) {
		/* connect ADDR PORT MS: one TCP connect (IPv4 or IPv6), waiting up to MS ms; prints
		 * "connected", "timeout" (nothing answered) or the errno (ECONNREFUSED for a reset,
		 * ENETUNREACH or EHOSTUNREACH for an ICMP error). */
		struct sockaddr_storage a;
		socklen_t alen = addr_of(p, atoi(argv[3]), &a);
		if (!alen) { errno = EINVAL; return fail(); }
		int fd = socket(a.ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
		if (fd < 0) return fail();
		if (connect(fd, (struct sockaddr *)&a, alen) && errno != EINPROGRESS) return fail();
		struct pollfd pf = { .fd = fd, .events = POLLOUT };
		if (poll(&pf, 1, atoi(argv[4])) != 1) { puts("timeout"); return 0; }
		int err = 0;
		socklen_t len = sizeof err;
		if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len)) return fail();
		if (err) { errno = err; return fail(); }
		puts("connected");
	} else if (!strcmp(cmd, "tcppeer")) {
		/* tcppeer PORT: tells each client the address it comes from ("IP:PORT\n", IPv6 as
		 * "[IP]:PORT\n"), forever, on IPv4 and IPv6. */
		int fd = bind_any(SOCK_STREAM, atoi(p));
		if (fd < 0 || listen(fd, 1024)) return fail();
		for (;;) {
			struct sockaddr_in6 from;
			socklen_t fl = sizeof from;
			int c = accept(fd, (struct sockaddr *)&from, &fl);
			if (c < 0) continue;
			char line[80];
			peer_name(&from, line, sizeof line - 1);
			strcat(line, "\n");
			(void)!write(c, line, strlen(line));
			close(c);
		}
	} else {
		fprintf(stderr, "probe: unknown command %s\n", cmd);
		return 2;
	}
	return 0;
}
