/*
 * bench/dnsload.c: the DNS load generator of the sidecar benchmark (bench/sidecar.py), in C for the same
 * reason as loadc.c: a Python client on the client core would be the bottleneck. Same JSON-lines output as
 * loadc (measure_start, measure_end, result); the runner compiles it into the run directory.
 *
 *   dnsload --server IP --name NAME [--port 53] [--expect noerror|nxdomain]
 *           [--outstanding N | --rate QPS] [--warmup S] [--duration S] [--timeout S]
 *
 * One connected UDP socket sends "NAME A IN" queries (RD set, no EDNS: what glibc's and musl's stub
 * resolvers send), each with its own ID.
 *   --outstanding N (closed loop): N queries are kept in flight; each answer sends the next one.
 *   --rate QPS (open loop): one query every 1/QPS s (a timerfd), whatever the answers do.
 * Only answers inside [warmup, warmup+duration) count; their latencies (send to answer) give p50/p99/p999.
 * An answer must have QR set, TC clear and the expected rcode (noerror: with at least one answer record);
 * anything else is counted as "wrong". A query unanswered after --timeout is counted as lost (and, in the
 * closed loop, replaced). Every wait is bounded: the run ends by warmup+duration+timeout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_OUTSTANDING 4096
#define N_IDS 65536

static char server[64], name[256], expect[16] = "noerror";
static int port = 53, outstanding = 16;
static double rate, warmup = 0.5, duration = 5.0, timeout_s = 1.0;
static unsigned char query[512];
static size_t query_len;
static double sent_at[N_IDS];
static unsigned char pending[N_IDS];
static long in_flight, sent, lost, wrong, overrun, rcodes[16];
static double *lat;
static size_t n_lat, cap_lat;

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
    fprintf(stderr, "dnsload: %s\n", why);
    exit(2);
}

static void parse(int argc, char **argv) {
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--server")) snprintf(server, sizeof server, "%s", v);
        else if (!strcmp(k, "--port")) port = atoi(v);
        else if (!strcmp(k, "--name")) snprintf(name, sizeof name, "%s", v);
        else if (!strcmp(k, "--expect")) snprintf(expect, sizeof expect, "%s", v);
        else if (!strcmp(k, "--outstanding")) outstanding = atoi(v);
        else if (!strcmp(k, "--rate")) rate = atof(v);
        else if (!strcmp(k, "--warmup")) warmup = atof(v);
        else if (!strcmp(k, "--duration")) duration = atof(v);
        else if (!strcmp(k, "--timeout")) timeout_s = atof(v);
        else fail_usage("unknown option");
    }
    if (!server[0] || !name[0]) fail_usage("--server IP and --name NAME are required");
    if (port < 1 || port > 65535) fail_usage("--port out of range");
    if (outstanding < 1 || outstanding > MAX_OUTSTANDING) fail_usage("--outstanding out of range");
    if (rate < 0 || rate > 1e6) fail_usage("--rate out of range");
    if (strcmp(expect, "noerror") && strcmp(expect, "nxdomain")) fail_usage("--expect is noerror or nxdomain");
}

/* The query's wire form, ID 0: header (RD), the name as labels, type A, class IN. */
static void build_query(void) {
    static const unsigned char head[12] = {0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0};
    memcpy(query, head, sizeof head);
    size_t at = sizeof head;
    const char *label = name;
    while (*label) {
        const char *dot = strchr(label, '.');
        size_t len = dot ? (size_t)(dot - label) : strlen(label);
        if (len == 0 || len > 63 || at + len + 6 > sizeof query) fail_usage("bad --name");
        query[at++] = (unsigned char)len;
        memcpy(query + at, label, len);
        at += len;
        label += len + (dot ? 1 : 0);
    }
    query[at++] = 0;
    query[at++] = 0, query[at++] = 1; /* A */
    query[at++] = 0, query[at++] = 1; /* IN */
    query_len = at;
}

static unsigned next_id;

static int send_query(int fd, double t) {
    unsigned id = next_id;
    for (int tries = 0; pending[id] && tries < N_IDS; tries++) id = (id + 1) & 0xffff; /* skip IDs in flight */
    next_id = (id + 1) & 0xffff;
    query[0] = id >> 8, query[1] = id & 0xff;
    if (send(fd, query, query_len, 0) != (ssize_t)query_len) return -1;
    pending[id] = 1;
    sent_at[id] = t;
    in_flight++;
    sent++;
    return 0;
}

static void keep(double latency) {
    if (n_lat == cap_lat) {
        cap_lat = cap_lat ? cap_lat * 2 : 65536;
        lat = realloc(lat, cap_lat * sizeof *lat);
        if (!lat) fail_usage("out of memory");
    }
    lat[n_lat++] = latency;
}

/* One answer: match its ID, check it, keep its latency when inside the window; 1 when it freed a slot. */
static int answer(const unsigned char *buf, ssize_t n, double t, double win_start, double win_end) {
    if (n < 12) { wrong++; return 0; }
    unsigned id = (unsigned)buf[0] << 8 | buf[1];
    if (!pending[id]) return 0; /* a late answer to a query already counted lost */
    pending[id] = 0;
    in_flight--;
    int rcode = buf[3] & 0x0f, tc = buf[2] & 0x02, qr = buf[2] & 0x80, ancount = buf[6] << 8 | buf[7];
    rcodes[rcode]++;
    int ok = qr && !tc && (!strcmp(expect, "noerror") ? rcode == 0 && ancount > 0 : rcode == 3);
    if (!ok) wrong++;
    else if (t >= win_start && t < win_end) keep(t - sent_at[id]);
    return 1;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double q) {
    if (!n_lat) return -1;
    long rank = (long)ceil(q * n_lat) - 1; /* nearest rank, as loadc */
    if (rank < 0) rank = 0;
    if ((size_t)rank >= n_lat) rank = n_lat - 1;
    return lat[rank] * 1000;
}

/* Queries older than the timeout are lost; returns how many were dropped now. */
static long expire(double t) {
    static unsigned oldest;
    long dropped = 0;
    for (unsigned scanned = 0; scanned < N_IDS && oldest != next_id; scanned++) {
        if (pending[oldest]) {
            if (t - sent_at[oldest] <= timeout_s) break;
            pending[oldest] = 0;
            in_flight--;
            lost++;
            dropped++;
        }
        oldest = (oldest + 1) & 0xffff;
    }
    return dropped;
}

int main(int argc, char **argv) {
    parse(argc, argv);
    build_query();
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int size = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    struct sockaddr_in dest = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, server, &dest.sin_addr) != 1) fail_usage("--server must be an IPv4 literal");
    if (connect(fd, (struct sockaddr *)&dest, sizeof dest)) {
        printf("{\"event\": \"result\", \"error\": \"connect: %s\"}\n", strerror(errno));
        return 1;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    int tfd = -1;
    double t0 = now(), win_start = t0 + warmup, win_end = win_start + duration, hard_end = win_end + timeout_s + 1;
    if (rate > 0) {
        tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        long ns = (long)(1e9 / rate);
        struct itimerspec its = {.it_interval = {ns / 1000000000L, ns % 1000000000L},
                                 .it_value = {ns / 1000000000L, ns % 1000000000L}};
        timerfd_settime(tfd, 0, &its, NULL);
        struct epoll_event tev = {.events = EPOLLIN, .data.fd = tfd};
        epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev);
    } else {
        for (int i = 0; i < outstanding; i++) send_query(fd, now());
    }
    int started_mark = 0, ended_mark = 0;
    long send_errors = 0;
    unsigned char buf[4096];
    struct epoll_event events[4];
    for (;;) {
        double t = now();
        if (!started_mark && t >= win_start) { emit("measure_start"); started_mark = 1; }
        if (!ended_mark && t >= win_end) { emit("measure_end"); ended_mark = 1; }
        long dropped = expire(t);
        if (rate <= 0 && t < win_end)
            for (long i = 0; i < dropped; i++) send_errors += send_query(fd, t) != 0;
        if ((t >= win_end && in_flight == 0) || t > hard_end) break;
        int n = epoll_wait(ep, events, 4, 1);
        for (int i = 0; i < n; i++) {
            if (events[i].data.fd == tfd) {
                uint64_t ticks = 0;
                if (read(tfd, &ticks, sizeof ticks) != sizeof ticks) continue;
                double tn = now();
                for (uint64_t k = 0; k < ticks && tn < win_end; k++) {
                    if (in_flight >= MAX_OUTSTANDING) { overrun++; continue; }
                    send_errors += send_query(fd, tn) != 0;
                }
                continue;
            }
            ssize_t r;
            while ((r = recv(fd, buf, sizeof buf, 0)) >= 0) {
                double tn = now();
                if (answer(buf, r, tn, win_start, win_end) && rate <= 0 && tn < win_end)
                    send_errors += send_query(fd, tn) != 0;
            }
        }
    }
    qsort(lat, n_lat, sizeof *lat, cmp_double);
    printf("{\"event\": \"result\", \"completed\": %zu, \"per_s\": %.3f, \"p50_ms\": %.6f, \"p99_ms\": %.6f, "
           "\"p999_ms\": %.6f, \"max_ms\": %.6f, \"sent\": %ld, \"lost\": %ld, \"wrong\": %ld, \"overrun\": %ld, "
           "\"send_errors\": %ld, \"unanswered_at_end\": %ld, \"mode\": \"%s\", \"rcodes\": {",
           n_lat, n_lat / duration, pct(0.50), pct(0.99), pct(0.999), n_lat ? lat[n_lat - 1] * 1000 : -1.0, sent,
           lost, wrong, overrun, send_errors, in_flight, rate > 0 ? "rate" : "outstanding");
    int first = 1;
    for (int i = 0; i < 16; i++)
        if (rcodes[i]) { printf("%s\"%d\": %ld", first ? "" : ", ", i, rcodes[i]); first = 0; }
    printf("}}\n");
    fflush(stdout);
    return 0;
}
