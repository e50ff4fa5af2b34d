/*
 * bench/loadc.c: the C load generator and echo origin, for the figures where
 * Python on the client core would be the bottleneck (new tunnels/s, bulk MiB/s).
 * Same command line and the same JSON-lines output as bench/load.py and
 * bench/origin.py, which are the fallback when there is no C compiler. The
 * runner (bench/runner.py) compiles it into the run directory.
 *
 *   loadc tunnels --proxy HOST:PORT|direct --target NAME:PORT --hello FILE
 *                 [--origin-host IP] [--concurrency N] [--warmup S] [--duration S] [--timeout S]
 *                 [--header 'Name: value' ...]   (extra lines in each CONNECT, e.g. Proxy-Authorization)
 *   loadc bulk    --proxy HOST:PORT|direct --target NAME:PORT --bytes N [--origin-host IP] [--timeout S]
 *   loadc echo    --port P [--port P ...] [--bind IP]     (default 127.0.0.1; until SIGTERM)
 *
 * tunnels: CONCURRENCY connections in flight on one epoll loop, each:
 * connect, CONNECT NAME:PORT (unless direct), read the 200, send the canned
 * ClientHello, read as many bytes back, close, start again. Only completions
 * inside [warmup, warmup+duration) count; their latencies (connect to echo)
 * give p50/p99. bulk: one tunnel, "SEND n\n", recv into one 1 MiB buffer.
 * echo: an epoll server writing back every byte it reads, closing when the
 * client does; prints {"event": "ready"} once listening.
 * Every wait is bounded: a connection older than --timeout is aborted and
 * counted as an error; the whole run ends by warmup+duration+timeout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <stdint.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONC 4096
#define HEAD_MAX 8192
#define N_ERR 6

enum state { FREE, CONNECTING, HEAD, ECHO };
static const char *err_names[N_ERR] = {"connect", "closed early", "status", "timeout", "head too large", "write"};

struct slot {
    int fd;
    enum state st;
    double began;
    size_t got;
    size_t head_len;
    char head[HEAD_MAX];
};

static char proxy_host[256] = "direct", target_name[256], origin_host[64] = "127.0.0.1", hello_path[1024];
static char bind_host[64] = "127.0.0.1"; /* echo: the address it listens on */
static int target_port, proxy_port, concurrency = 16;
static double warmup = 0.5, duration = 5.0, timeout_s = 10.0;
static long long bulk_bytes = 1LL << 30;
static struct sockaddr_in dest;
static char connect_req[HEAD_MAX];
static char extra_headers[HEAD_MAX / 2];
static size_t extra_len;
static size_t connect_len;
static char *hello;
static size_t hello_len;
static long errors[N_ERR], opened;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void emit(const char *event) {
    printf("{\"event\": \"%s\"}\n", event);
    fflush(stdout);
}

static void fail_usage(const char *why) {
    fprintf(stderr, "loadc: %s\n", why);
    exit(2);
}

static int split_hostport(const char *s, char *host, size_t hostlen, int *port) {
    const char *colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= hostlen) return -1;
    memcpy(host, s, colon - s);
    host[colon - s] = 0;
    *port = atoi(colon + 1);
    return *port > 0 && *port < 65536 ? 0 : -1;
}

#define MAX_PORTS 8
static int echo_ports[MAX_PORTS], n_echo_ports;

static void parse(int argc, char **argv) {
    for (int i = 2; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--port")) {
            if (n_echo_ports == MAX_PORTS) fail_usage("too many --port");
            echo_ports[n_echo_ports++] = atoi(v);
        } else if (!strcmp(k, "--bind")) snprintf(bind_host, sizeof bind_host, "%s", v);
        else if (!strcmp(k, "--proxy")) snprintf(proxy_host, sizeof proxy_host, "%s", v);
        else if (!strcmp(k, "--target")) {
            if (split_hostport(v, target_name, sizeof target_name, &target_port)) fail_usage("bad --target");
        } else if (!strcmp(k, "--origin-host")) snprintf(origin_host, sizeof origin_host, "%s", v);
        else if (!strcmp(k, "--hello")) snprintf(hello_path, sizeof hello_path, "%s", v);
        else if (!strcmp(k, "--concurrency")) concurrency = atoi(v);
        else if (!strcmp(k, "--warmup")) warmup = atof(v);
        else if (!strcmp(k, "--duration")) duration = atof(v);
        else if (!strcmp(k, "--timeout")) timeout_s = atof(v);
        else if (!strcmp(k, "--bytes")) bulk_bytes = atoll(v);
        else if (!strcmp(k, "--header")) {
            size_t n = strlen(v);
            if (strpbrk(v, "\r\n") || extra_len + n + 2 >= sizeof extra_headers) fail_usage("bad or too long --header");
            memcpy(extra_headers + extra_len, v, n);
            memcpy(extra_headers + extra_len + n, "\r\n", 2);
            extra_len += n + 2;
            extra_headers[extra_len] = 0;
        }
        else fail_usage("unknown option");
    }
    if (!strcmp(argv[1], "echo")) return;
    if (!target_port) fail_usage("--target NAME:PORT is required");
    if (concurrency < 1 || concurrency > MAX_CONC) fail_usage("--concurrency out of range");
    memset(&dest, 0, sizeof dest);
    dest.sin_family = AF_INET;
    if (!strcmp(proxy_host, "direct")) {
        dest.sin_port = htons(target_port);
        if (inet_pton(AF_INET, origin_host, &dest.sin_addr) != 1) fail_usage("bad --origin-host");
        connect_len = 0;
    } else {
        char host[256];
        if (split_hostport(proxy_host, host, sizeof host, &proxy_port)) fail_usage("bad --proxy");
        dest.sin_port = htons(proxy_port);
        if (inet_pton(AF_INET, host, &dest.sin_addr) != 1) fail_usage("--proxy must be an IPv4 literal");
        connect_len = snprintf(connect_req, sizeof connect_req, "CONNECT %s:%d HTTP/1.1\r\nHost: %s:%d\r\n%s\r\n",
                               target_name, target_port, target_name, target_port, extra_headers);
    }
}

static void load_hello(void) {
    FILE *f = fopen(hello_path, "rb");
    if (!f) fail_usage("cannot open --hello file");
    hello = malloc(HEAD_MAX);
    hello_len = fread(hello, 1, HEAD_MAX, f);
    fclose(f);
    if (!hello_len) fail_usage("empty --hello file");
}

/* ---- tunnels ---- */

static int ep;
static struct slot *slots;
static double *lat;
static size_t n_lat, cap_lat;

static void start(struct slot *s, double t) {
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    s->began = t;
    s->got = s->head_len = 0;
    opened++;
    if (s->fd < 0) { errors[0]++; s->st = FREE; return; }
    int one = 1;
    setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int r = connect(s->fd, (struct sockaddr *)&dest, sizeof dest);
    if (r < 0 && errno != EINPROGRESS) { close(s->fd); errors[0]++; s->st = FREE; return; }
    s->st = CONNECTING;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = s};
    epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
}

static void finish(struct slot *s, int err, double t, double win_start, double win_end) {
    close(s->fd); /* also removes it from the epoll set */
    s->st = FREE;
    if (err >= 0) errors[err]++;
    else if (t >= win_start && t < win_end) {
        if (n_lat == cap_lat) {
            cap_lat = cap_lat ? cap_lat * 2 : 65536;
            lat = realloc(lat, cap_lat * sizeof *lat);
            if (!lat) fail_usage("out of memory");
        }
        lat[n_lat++] = t - s->began;
    }
}

static int send_all(int fd, const char *buf, size_t len) {
    ssize_t w = send(fd, buf, len, MSG_NOSIGNAL);
    return w == (ssize_t)len ? 0 : -1;
}

/* Advance one connection on an event; returns -1 while in flight, else -2 (done ok) or an error index. */
static int step(struct slot *s) {
    char buf[16384];
    if (s->st == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) return 0;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
        epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
        if (connect_len) {
            s->st = HEAD;
            return send_all(s->fd, connect_req, connect_len) ? 5 : -1;
        }
        s->st = ECHO;
        return send_all(s->fd, hello, hello_len) ? 5 : -1;
    }
    ssize_t n = recv(s->fd, buf, sizeof buf, 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return -1;
    if (n <= 0) return 1;
    if (s->st == HEAD) {
        if (s->head_len + n > HEAD_MAX) return 4;
        memcpy(s->head + s->head_len, buf, n);
        s->head_len += n;
        char *end = memmem(s->head, s->head_len, "\r\n\r\n", 4);
        if (!end) return -1;
        if (s->head_len < 12 || memcmp(s->head + 9, "200", 3)) return 2;
        s->got = s->head_len - (end + 4 - s->head);
        s->st = ECHO;
        if (send_all(s->fd, hello, hello_len)) return 5;
    } else {
        s->got += n;
    }
    return s->got >= hello_len ? -2 : -1;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double q) {
    if (!n_lat) return -1;
    long rank = (long)ceil(q * n_lat) - 1; /* nearest rank, as bench/load.py */
    if (rank < 0) rank = 0;
    if ((size_t)rank >= n_lat) rank = n_lat - 1;
    return lat[rank] * 1000;
}

static int run_tunnels(void) {
    load_hello();
    ep = epoll_create1(EPOLL_CLOEXEC);
    slots = calloc(concurrency, sizeof *slots);
    double t0 = now(), win_start = t0 + warmup, win_end = win_start + duration, hard_end = win_end + timeout_s + 5;
    int started_mark = 0, ended_mark = 0;
    for (int i = 0; i < concurrency; i++) start(&slots[i], now());
    struct epoll_event events[MAX_CONC];
    for (;;) {
        double t = now();
        if (!started_mark && t >= win_start) { emit("measure_start"); started_mark = 1; }
        if (!ended_mark && t >= win_end) { emit("measure_end"); ended_mark = 1; }
        int busy = 0;
        for (int i = 0; i < concurrency; i++) {
            struct slot *s = &slots[i];
            if (s->st != FREE && t - s->began > timeout_s) finish(s, 3, t, win_start, win_end);
            if (s->st == FREE && t < win_end) start(s, t);
            busy += s->st != FREE;
        }
        if (!busy && t >= win_end) break;
        if (t > hard_end) break;
        int n = epoll_wait(ep, events, MAX_CONC, 5);
        for (int i = 0; i < n; i++) {
            struct slot *s = events[i].data.ptr;
            int r = step(s);
            if (r == -1) continue;
            double tn = now();
            finish(s, r == -2 ? -1 : r, tn, win_start, win_end);
            if (tn < win_end) start(s, tn);
        }
    }
    long stuck = 0;
    for (int i = 0; i < concurrency; i++)
        if (slots[i].st != FREE) { stuck++; close(slots[i].fd); }
    qsort(lat, n_lat, sizeof *lat, cmp_double);
    printf("{\"event\": \"result\", \"completed\": %zu, \"per_s\": %.3f, \"p50_ms\": %.6f, \"p99_ms\": %.6f, "
           "\"opened\": %ld, \"stuck_workers\": %ld, \"errors\": {",
           n_lat, n_lat / duration, pct(0.50), pct(0.99), opened, stuck);
    int first = 1;
    for (int i = 0; i < N_ERR; i++)
        if (errors[i]) { printf("%s\"%s\": %ld", first ? "" : ", ", err_names[i], errors[i]); first = 0; }
    printf("}}\n");
    fflush(stdout);
    return 0;
}

/* ---- bulk ---- */

static void result_error(const char *what) {
    printf("{\"event\": \"result\", \"error\": \"%s\"}\n", what);
    fflush(stdout);
}

static int run_bulk(void) {
    static char buf[1 << 20];
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct timeval tv = {.tv_sec = (long)timeout_s, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&dest, sizeof dest)) { result_error("connect"); return 1; }
    long long got = 0;
    if (connect_len) {
        size_t head = 0;
        if (send_all(fd, connect_req, connect_len)) { result_error("write"); return 1; }
        char *end = NULL;
        while (!end) {
            ssize_t n = recv(fd, buf + head, sizeof buf - head, 0);
            if (n <= 0) { result_error("closed before the 200"); return 1; }
            head += n;
            end = memmem(buf, head, "\r\n\r\n", 4);
            if (!end && head > HEAD_MAX) { result_error("head too large"); return 1; }
        }
        if (head < 12 || memcmp(buf + 9, "200", 3)) { result_error("status not 200"); return 1; }
        got = head - (end + 4 - buf);
    }
    char req[64];
    int len = snprintf(req, sizeof req, "SEND %lld\n", bulk_bytes);
    emit("measure_start");
    double t0 = now(), deadline = t0 + timeout_s;
    if (send_all(fd, req, len)) { result_error("write"); return 1; }
    while (got < bulk_bytes) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n <= 0 || now() > deadline) {
            printf("{\"event\": \"result\", \"error\": \"%s after %lld bytes\"}\n", n <= 0 ? "closed" : "timeout", got);
            return 1;
        }
        got += n;
    }
    double elapsed = now() - t0;
    emit("measure_end");
    close(fd);
    printf("{\"event\": \"result\", \"bytes\": %lld, \"seconds\": %.6f, \"mib_per_s\": %.3f}\n", bulk_bytes, elapsed,
           bulk_bytes / elapsed / 1048576.0);
    fflush(stdout);
    return 0;
}

/* ---- echo origin ---- */

static volatile sig_atomic_t stopping;
static void on_term(int sig) { (void)sig; stopping = 1; }

static int run_echo(void) {
    static char buf[65536];
    if (!n_echo_ports) fail_usage("echo needs --port");
    struct sigaction sa = {.sa_handler = on_term};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    ep = epoll_create1(EPOLL_CLOEXEC);
    int listeners[MAX_PORTS];
    for (int i = 0; i < n_echo_ports; i++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(echo_ports[i])};
        if (inet_pton(AF_INET, bind_host, &a.sin_addr) != 1) fail_usage("--bind must be an IPv4 literal");
        if (bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, 8192)) {
            fprintf(stderr, "loadc echo: cannot listen on %s:%d: %s\n", bind_host, echo_ports[i], strerror(errno));
            return 1;
        }
        listeners[i] = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)i << 32 | (uint32_t)fd};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
    emit("ready");
    struct epoll_event events[256];
    while (!stopping) {
        int n = epoll_wait(ep, events, 256, 1000);
        for (int i = 0; i < n; i++) {
            int fd = (int)(uint32_t)events[i].data.u64, is_listener = 0;
            for (int j = 0; j < n_echo_ports; j++) is_listener |= listeners[j] == fd;
            if (is_listener) {
                int c;
                while ((c = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    int one = 1;
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint32_t)c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
                }
                continue;
            }
            ssize_t r = recv(fd, buf, sizeof buf, 0);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (r <= 0) { close(fd); continue; }
            ssize_t off = 0;
            while (off < r) { /* rare: the peer's window is full; wait for it, bounded by SO_SNDTIMEO */
                ssize_t w = send(fd, buf + off, r - off, MSG_NOSIGNAL);
                if (w > 0) { off += w; continue; }
                if (w < 0 && errno == EAGAIN) {
                    struct timeval tv = {.tv_sec = 5};
                    int flags = fcntl(fd, F_GETFL);
                    fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
                    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
                    w = send(fd, buf + off, r - off, MSG_NOSIGNAL);
                    fcntl(fd, F_SETFL, flags);
                    if (w > 0) { off += w; continue; }
                }
                close(fd);
                break;
            }
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) fail_usage("usage: loadc tunnels|bulk --proxy HOST:PORT|direct --target NAME:PORT ...");
    parse(argc, argv);
    if (!strcmp(argv[1], "tunnels")) return run_tunnels();
    if (!strcmp(argv[1], "bulk")) return run_bulk();
    if (!strcmp(argv[1], "echo")) return run_echo();
    fail_usage("mode must be tunnels, bulk or echo");
    return 2;
}
