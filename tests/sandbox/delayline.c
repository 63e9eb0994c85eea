/*
 * A delay line between two network interfaces (the test sandbox's "WAN"; this kernel has no
 * netem).  Every frame that arrives on one interface leaves on the other DELAY_US later; a
 * direction holds at most QUEUE_BYTES (more is dropped, like a router's full queue).  The
 * rate is not ours: `tc tbf` on the outgoing interfaces shapes it, and when tbf's queue is
 * full our send blocks, so the frames wait here.
 *
 * usage: delayline IFACE_A IFACE_B DELAY_US QUEUE_BYTES
 *
 * Runs until killed (SIGTERM), or until its parent dies.  Prints "ready" once both packet
 * sockets are bound.  Frames must fit MAX_FRAME: the sandbox turns segmentation offloads
 * off on the endpoints, so no frame is larger than the MTU.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_FRAME 65600
#define SLOTS 65536

struct frame {
    uint64_t due_ns;
    size_t len;
    unsigned char *data;
};

struct direction {
    const char *name;
    int in_fd, out_fd, out_index;
    uint64_t delay_ns;
    size_t queue_limit, queued;
    struct frame ring[SLOTS];
    unsigned head, tail; /* head: next to send; tail: next free */
    pthread_mutex_t lock;
    pthread_cond_t nonempty;
    unsigned long long forwarded, dropped, truncated;
};

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int open_bound(const char *ifname, int *index) {
    int fd = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (fd < 0) {
        perror("socket(AF_PACKET)");
        exit(2);
    }
    *index = (int)if_nametoindex(ifname);
    if (*index == 0) {
        fprintf(stderr, "delayline: no interface %s\n", ifname);
        exit(2);
    }
    struct sockaddr_ll addr;
    memset(&addr, 0, sizeof addr);
    addr.sll_family = AF_PACKET;
    addr.sll_protocol = htons(ETH_P_ALL);
    addr.sll_ifindex = *index;
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("bind");
        exit(2);
    }
    int one = 1;
    /* our own sends on this interface must not come back to us as input */
    if (setsockopt(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one) < 0) {
        perror("PACKET_IGNORE_OUTGOING");
        exit(2);
    }
    int rcv = 32 << 20, snd = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcv, sizeof rcv);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &snd, sizeof snd);
    return fd;
}

static void *receive(void *arg) {
    struct direction *d = arg;
    unsigned char *buf = malloc(MAX_FRAME);
    for (;;) {
        ssize_t n = recv(d->in_fd, buf, MAX_FRAME, MSG_TRUNC);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("recv");
            exit(3);
        }
        uint64_t due = now_ns() + d->delay_ns;
        if (n > MAX_FRAME) {
            d->truncated++;
            continue;
        }
        pthread_mutex_lock(&d->lock);
        if (d->tail - d->head >= SLOTS || d->queued + (size_t)n > d->queue_limit) {
            d->dropped++;
            pthread_mutex_unlock(&d->lock);
            continue;
        }
        pthread_mutex_unlock(&d->lock);
        unsigned char *copy = malloc((size_t)n);
        memcpy(copy, buf, (size_t)n);
        pthread_mutex_lock(&d->lock);
        struct frame *f = &d->ring[d->tail % SLOTS];
        f->due_ns = due;
        f->len = (size_t)n;
        f->data = copy;
        d->tail++;
        d->queued += (size_t)n;
        pthread_cond_signal(&d->nonempty);
        pthread_mutex_unlock(&d->lock);
    }
    return NULL;
}

static void *transmit(void *arg) {
    struct direction *d = arg;
    struct sockaddr_ll to;
    memset(&to, 0, sizeof to);
    to.sll_family = AF_PACKET;
    to.sll_ifindex = d->out_index;
    to.sll_halen = ETH_ALEN;
    for (;;) {
        pthread_mutex_lock(&d->lock);
        while (d->head == d->tail)
            pthread_cond_wait(&d->nonempty, &d->lock);
        struct frame f = d->ring[d->head % SLOTS];
        pthread_mutex_unlock(&d->lock);
        uint64_t now = now_ns();
        if (f.due_ns > now) {
            struct timespec ts = {.tv_sec = (time_t)(f.due_ns / 1000000000ull),
                                  .tv_nsec = (long)(f.due_ns % 1000000000ull)};
            while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
            }
        }
        memcpy(to.sll_addr, f.data, ETH_ALEN);
        for (;;) {
            ssize_t sent = sendto(d->out_fd, f.data, f.len, 0, (struct sockaddr *)&to, sizeof to);
            if (sent >= 0) {
                d->forwarded++;
                break;
            }
            if (errno == ENOBUFS) { /* tbf's queue is full: wait for it like a router would */
                struct timespec pause = {.tv_sec = 0, .tv_nsec = 50000};
                nanosleep(&pause, NULL);
                continue;
            }
            if (errno != EINTR) {
                d->dropped++;
                break;
            }
        }
        free(f.data);
        pthread_mutex_lock(&d->lock);
        d->head++;
        d->queued -= f.len;
        pthread_mutex_unlock(&d->lock);
    }
    return NULL;
}

static struct direction forward, backward;

static void report(int sig) {
    (void)sig;
    char line[256];
    int n = snprintf(line, sizeof line,
                     "delayline: forwarded %llu/%llu, dropped %llu/%llu, truncated %llu/%llu\n",
                     forward.forwarded, backward.forwarded, forward.dropped, backward.dropped,
                     forward.truncated, backward.truncated);
    if (n > 0)
        (void)!write(2, line, (size_t)n);
    _exit(0);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s IFACE_A IFACE_B DELAY_US QUEUE_BYTES\n", argv[0]);
        return 2;
    }
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    signal(SIGTERM, report);
    signal(SIGINT, report);
    uint64_t delay_ns = strtoull(argv[3], NULL, 10) * 1000ull;
    size_t queue = (size_t)strtoull(argv[4], NULL, 10);
    int index_a, index_b;
    int fd_a = open_bound(argv[1], &index_a);
    int fd_b = open_bound(argv[2], &index_b);
    struct direction *dirs[2] = {&forward, &backward};
    forward.name = "a->b";
    forward.in_fd = fd_a;
    forward.out_fd = fd_b;
    forward.out_index = index_b;
    backward.name = "b->a";
    backward.in_fd = fd_b;
    backward.out_fd = fd_a;
    backward.out_index = index_a;
    pthread_t threads[4];
    for (int i = 0; i < 2; i++) {
        dirs[i]->delay_ns = delay_ns;
        dirs[i]->queue_limit = queue;
        pthread_mutex_init(&dirs[i]->lock, NULL);
        pthread_cond_init(&dirs[i]->nonempty, NULL);
        pthread_create(&threads[2 * i], NULL, receive, dirs[i]);
        pthread_create(&threads[2 * i + 1], NULL, transmit, dirs[i]);
    }
    printf("ready\n");
    fflush(stdout);
    for (int i = 0; i < 4; i++)
        pthread_join(threads[i], NULL);
    return 0;
}
