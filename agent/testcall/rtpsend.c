/* rtpsend: the load tests' RTP sender in compiled code (see rtpsend.py).
 *
 * Reads stream specs from a FIFO, the same protocol as agent/testcall/rtp.py's
 * FifoControl: lines of whitespace-separated HOST:PORT=FILE[,src=LOCALPORT], FILE an
 * 8 kHz mono 16-bit WAV sent as G.711 A-law (PT 8), 160 bytes per packet, until the
 * file ends. Every 20 ms tick (absolute CLOCK_MONOTONIC schedule) sends one packet of
 * every stream with sendmmsg, one call per socket (streams without src= share one).
 * Lateness (how far behind the schedule the last packet of a tick went out) of every
 * tick that sent something goes into a 50 us histogram; the stats file is rewritten
 * (write + rename) each second, within a tick of SIGUSR1 and at exit (SIGTERM/SIGINT)
 * as key=value pairs; "written" counts the rewrites.
 *
 * Usage: rtpsend FIFO STATSFILE
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PTIME_NS 20000000LL
#define PAYLOAD 160
#define PT_PCMA 8
#define MAX_STREAMS 8192
#define MAX_FILES 64
#define BATCH 1024
#define BUCKET_NS 50000LL
#define BUCKETS 200000 /* 10 s in 50 us buckets; later ticks land in the last */

struct payloads { char *path; unsigned char *data; size_t packets; };
struct stream {
    int fd;
    struct sockaddr_in dest;
    const struct payloads *file;
    size_t sent;
    uint16_t seq;
    uint32_t ts, ssrc;
    unsigned char header[12];
};

static struct payloads files[MAX_FILES];
static size_t nfiles;
static struct stream *streams[MAX_STREAMS];
static size_t nstreams;
static int shared_fd = -1;
static volatile sig_atomic_t stopping, report;
static uint32_t hist[BUCKETS];
static uint64_t ticks, packets, added, refused, reanchors, written;
static int64_t late_max_ns;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static unsigned char alaw(int16_t sample) { /* ITU-T G.711, as audioop.lin2alaw */
    static const int seg_end[8] = {0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF};
    int value = sample >> 3, mask, seg;
    if (value >= 0) {
        mask = 0xD5;
    } else {
        mask = 0x55;
        value = -value - 1;
    }
    for (seg = 0; seg < 8 && value > seg_end[seg]; seg++) {}
    if (seg >= 8) return (unsigned char)(0x7F ^ mask);
    int aval = seg << 4;
    aval |= seg < 2 ? (value >> 1) & 0xF : (value >> seg) & 0xF;
    return (unsigned char)(aval ^ mask);
}

static uint32_t le32(const unsigned char *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }
static uint16_t le16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }

/* The A-law packets of a WAV file, loaded once per path; NULL if it is not 8 kHz mono s16. */
static const struct payloads *load(const char *path) {
    for (size_t i = 0; i < nfiles; i++)
        if (strcmp(files[i].path, path) == 0) return &files[i];
    if (nfiles == MAX_FILES) return NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *raw = size > 12 ? malloc((size_t)size) : NULL;
    size_t got = raw ? fread(raw, 1, (size_t)size, f) : 0;
    fclose(f);
    const unsigned char *pcm = NULL;
    size_t pcm_len = 0;
    int format_ok = 0;
    if (got == (size_t)size && memcmp(raw, "RIFF", 4) == 0 && memcmp(raw + 8, "WAVE", 4) == 0) {
        for (size_t at = 12; at + 8 <= got;) {
            uint32_t len = le32(raw + at + 4);
            const unsigned char *body = raw + at + 8;
            if (len > got - at - 8) len = (uint32_t)(got - at - 8);
            if (memcmp(raw + at, "fmt ", 4) == 0 && len >= 16)
                format_ok = le16(body) == 1 && le16(body + 2) == 1 && le32(body + 4) == 8000 &&
                            le16(body + 14) == 16;
            if (memcmp(raw + at, "data", 4) == 0) { pcm = body; pcm_len = len; break; }
            at += 8 + len + (len & 1);
        }
    }
    if (!format_ok || !pcm) { free(raw); return NULL; }
    size_t samples = pcm_len / 2, count = (samples + PAYLOAD - 1) / PAYLOAD;
    unsigned char *data = malloc(count * PAYLOAD);
    memset(data, 0xD5, count * PAYLOAD); /* A-law silence pads the last packet */
    for (size_t i = 0; i < samples; i++) data[i] = alaw((int16_t)le16(pcm + 2 * i));
    free(raw);
    files[nfiles] = (struct payloads){strdup(path), data, count};
    return &files[nfiles++];
}

static int udp_socket(int src_port) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    int size = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    struct sockaddr_in local = {.sin_family = AF_INET, .sin_port = htons((uint16_t)src_port)};
    if (fd >= 0 && bind(fd, (struct sockaddr *)&local, sizeof local) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* HOST:PORT=FILE[,src=LOCALPORT] -> a new stream; 0 if refused. */
static int add_stream(char *spec) {
    char *eq = strchr(spec, '='), *colon, *src, *end;
    if (!eq || nstreams == MAX_STREAMS) return 0;
    *eq = '\0';
    colon = strrchr(spec, ':');
    if (!colon) return 0;
    *colon = '\0';
    long port = strtol(colon + 1, &end, 10), src_port = 0;
    if (*end || port <= 0 || port > 65535) return 0;
    if ((src = strstr(eq + 1, ",src=")) != NULL) {
        *src = '\0';
        src_port = strtol(src + 5, &end, 10);
        if (*end || src_port <= 0 || src_port > 65535) return 0;
    }
    struct stream s = {.fd = -1};
    s.dest.sin_family = AF_INET;
    s.dest.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, spec, &s.dest.sin_addr) != 1) return 0;
    if (!(s.file = load(eq + 1))) return 0;
    if (src_port) {
        s.fd = udp_socket((int)src_port);
    } else {
        if (shared_fd < 0) shared_fd = udp_socket(0);
        s.fd = shared_fd;
    }
    if (s.fd < 0) return 0;
    s.ssrc = (uint32_t)random() << 1 ^ (uint32_t)random();
    s.seq = (uint16_t)random();
    s.ts = (uint32_t)random() << 1 ^ (uint32_t)random();
    struct stream *copy = malloc(sizeof s);
    *copy = s;
    streams[nstreams++] = copy;
    return 1;
}

static void read_fifo(int fd, char *pending, size_t *used, size_t cap) {
    for (;;) {
        ssize_t n = read(fd, pending + *used, cap - 1 - *used);
        if (n <= 0) return;
        *used += (size_t)n;
        pending[*used] = '\0';
        char *line = pending, *nl;
        while ((nl = strchr(line, '\n')) != NULL) {
            *nl = '\0';
            char *save = NULL;
            for (char *tok = strtok_r(line, " \t\r", &save); tok; tok = strtok_r(NULL, " \t\r", &save)) {
                if (add_stream(tok)) added++;
                else { refused++; fprintf(stderr, "rtpsend: refused a stream spec\n"); }
            }
            line = nl + 1;
        }
        *used -= (size_t)(line - pending);
        memmove(pending, line, *used);
        if (*used == cap - 1) *used = 0; /* a line longer than the buffer: drop it */
    }
}

static void fill_header(struct stream *s) {
    unsigned char *h = s->header;
    h[0] = 0x80;
    h[1] = (unsigned char)((s->sent == 0 ? 0x80 : 0) | PT_PCMA);
    h[2] = (unsigned char)(s->seq >> 8); h[3] = (unsigned char)s->seq;
    h[4] = (unsigned char)(s->ts >> 24); h[5] = (unsigned char)(s->ts >> 16);
    h[6] = (unsigned char)(s->ts >> 8); h[7] = (unsigned char)s->ts;
    h[8] = (unsigned char)(s->ssrc >> 24); h[9] = (unsigned char)(s->ssrc >> 16);
    h[10] = (unsigned char)(s->ssrc >> 8); h[11] = (unsigned char)s->ssrc;
}

static void flush(int fd, struct mmsghdr *msgs, unsigned count) {
    unsigned done = 0;
    while (done < count) {
        int n = sendmmsg(fd, msgs + done, count - done, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            done++; /* an unreachable receiver must not stop the others */
        } else {
            done += (unsigned)n;
            packets += (unsigned)n;
        }
    }
}

/* One packet of every stream, batched per socket; finished streams are dropped. */
static void tick(void) {
    static struct mmsghdr msgs[BATCH];
    static struct iovec iov[BATCH][2];
    unsigned count = 0;
    int fd = -1;
    for (size_t i = 0; i < nstreams; i++) {
        struct stream *s = streams[i];
        if (s->fd != fd || count == BATCH) {
            if (count) flush(fd, msgs, count);
            count = 0;
            fd = s->fd;
        }
        fill_header(s);
        iov[count][0] = (struct iovec){s->header, 12};
        iov[count][1] = (struct iovec){s->file->data + s->sent * PAYLOAD, PAYLOAD};
        msgs[count].msg_hdr = (struct msghdr){.msg_name = &s->dest, .msg_namelen = sizeof s->dest,
                                              .msg_iov = iov[count], .msg_iovlen = 2};
        count++;
        s->sent++;
        s->seq++;
        s->ts += PAYLOAD;
    }
    if (count) flush(fd, msgs, count);
    size_t kept = 0;
    for (size_t i = 0; i < nstreams; i++) {
        struct stream *s = streams[i];
        if (s->sent < s->file->packets) {
            streams[kept++] = s;
        } else {
            if (s->fd != shared_fd) close(s->fd);
            free(s);
        }
    }
    nstreams = kept;
}

static int64_t late_percentile(double q) {
    if (!ticks) return 0;
    uint64_t rank = (uint64_t)(q / 100.0 * (double)ticks + 0.999999), seen = 0;
    if (rank < 1) rank = 1;
    for (size_t i = 0; i < BUCKETS; i++)
        if ((seen += hist[i]) >= rank) return (int64_t)(i + 1) * BUCKET_NS;
    return late_max_ns;
}

static void write_stats(const char *path) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    int64_t p50 = late_percentile(50), p99 = late_percentile(99);
    fprintf(f, "written=%llu pid=%d ticks=%llu packets=%llu streams_added=%llu streams_active=%zu "
               "refused=%llu reanchors=%llu late_p50_us=%lld late_p99_us=%lld late_max_us=%lld\n",
            (unsigned long long)++written, (int)getpid(), (unsigned long long)ticks, (unsigned long long)packets,
            (unsigned long long)added, nstreams, (unsigned long long)refused,
            (unsigned long long)reanchors, (long long)(p50 < late_max_ns ? p50 : late_max_ns) / 1000,
            (long long)(p99 < late_max_ns ? p99 : late_max_ns) / 1000, (long long)late_max_ns / 1000);
    fclose(f);
    rename(tmp, path);
}

static void on_signal(int sig) {
    if (sig == SIGUSR1) report = 1;
    else stopping = 1;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: rtpsend FIFO STATSFILE\n");
        return 2;
    }
    int fifo = open(argv[1], O_RDWR | O_NONBLOCK | O_CLOEXEC); /* never sees end-of-file */
    if (fifo < 0) {
        perror(argv[1]);
        return 1;
    }
    struct sigaction action = {.sa_handler = on_signal};
    sigaction(SIGTERM, &action, NULL);
    sigaction(SIGINT, &action, NULL);
    sigaction(SIGUSR1, &action, NULL);
    srandom((unsigned)(now_ns() ^ getpid()));
    static char pending[1 << 16];
    size_t used = 0;
    int64_t next = now_ns(), last_stats = next;
    write_stats(argv[2]);
    while (!stopping) {
        read_fifo(fifo, pending, &used, sizeof pending);
        if (nstreams) {
            tick();
            int64_t late = now_ns() - next;
            if (late < 0) late = 0;
            size_t bucket = (size_t)(late / BUCKET_NS);
            hist[bucket < BUCKETS ? bucket : BUCKETS - 1]++;
            if (late > late_max_ns) late_max_ns = late;
            ticks++;
        }
        next += PTIME_NS;
        int64_t now = now_ns();
        if (now - next > 1000000000LL) { /* hopelessly behind (host stalled): re-anchor */
            next = now;
            reanchors++;
        }
        if (report || now - last_stats >= 1000000000LL) {
            report = 0;
            write_stats(argv[2]);
            last_stats = now;
        }
        struct timespec wake = {(time_t)(next / 1000000000LL), (long)(next % 1000000000LL)};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &wake, NULL) == EINTR && !stopping) {}
    }
    write_stats(argv[2]);
    return 0;
}
