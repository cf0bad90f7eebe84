/* A C program on the shardcast C ABI: start a replica server in-process, push a directory to
 * it in the background while polling progress, then read the per-replica result.
 *
 *   push_demo push SRC ROOT            push SRC as demo@1 to a server rooted at ROOT
 *   push_demo cancel SRC ROOT          start pushing SRC, cancel once chunks move
 *   push_demo unreachable SRC ADDR     push to an address where nothing listens
 *   push_demo buffers - ROOT           push two buffers from memory (no source file) as demo@1:
 *                                      weights/layer0.bin (3 MiB + 5, byte i = (31 i + 7) mod 256)
 *                                      and meta.json
 *
 * Prints one line per event; exits 0 when the outcome is the expected one for the mode. Built
 * and run by ffi/tests/c_program.rs:
 *   cc push_demo.c -I ../include -L <target>/debug -lshardcast_ffi -Wl,-rpath,<target>/debug
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "shardcast.h"

static void print_error(const char *what, int rc) {
    char msg[512];
    sc_last_error(msg, sizeof msg);
    printf("%s: rc=%d error=%s\n", what, rc, msg);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s push|cancel|unreachable|buffers SRC ROOT|ADDR\n", argv[0]);
        return 2;
    }
    const char *mode = argv[1], *src = argv[2];
    printf("shardcast %s\n", sc_version());

    char addr[128];
    sc_server *server = NULL;
    if (strcmp(mode, "unreachable") == 0) {
        snprintf(addr, sizeof addr, "%s", argv[3]);
    } else {
        sc_server_opts so = {.listen = "127.0.0.1:0", .root = argv[3]};
        int rc = sc_server_start(&so, &server);
        if (rc != SC_OK) {
            print_error("sc_server_start", rc);
            return 1;
        }
        sc_server_addr(server, addr, sizeof addr);
        printf("server listening on %s\n", addr);
    }

    sc_push_opts po = {.source = src, .name = "demo", .version = 1, .to = addr, .chunk_size = 1 << 20};
    sc_push *push = NULL;
    int rc;
    /* Buffers must stay valid until the push has ended: they live until the end of main. */
    size_t weights_len = (3u << 20) + 5;
    unsigned char *weights = malloc(weights_len);
    static const char meta[] = "{\"step\": 1}\n";
    if (!weights) return 1;
    for (size_t i = 0; i < weights_len; i++) weights[i] = (unsigned char)(31 * i + 7);
    if (strcmp(mode, "buffers") == 0) {
        sc_buffer bufs[2] = {
            {.path = "weights/layer0.bin", .data = weights, .len = weights_len},
            {.path = "meta.json", .data = (const uint8_t *)meta, .len = sizeof meta - 1},
        };
        rc = sc_push_start_buffers(&po, bufs, 2, &push);
    } else {
        rc = sc_push_start(&po, &push);
    }
    if (rc != SC_OK) {
        print_error("sc_push_start", rc);
        return 1;
    }
    int cancelled = 0;
    for (;;) {
        rc = sc_push_wait(push, 20);
        if (rc != SC_ERR_TIMEOUT) break;
        sc_progress p;
        sc_push_poll(push, &p);
        printf("progress state=%d acked=%llu/%llu sent_chunks=%llu\n", p.state,
               (unsigned long long)p.acked_bytes, (unsigned long long)p.total_bytes,
               (unsigned long long)p.sent_chunks);
        if (strcmp(mode, "cancel") == 0 && !cancelled && p.sent_chunks > 0) {
            sc_push_cancel(push);
            cancelled = 1;
            printf("cancel requested\n");
        }
    }
    int ok;
    if (strcmp(mode, "push") == 0 || strcmp(mode, "buffers") == 0) {
        ok = rc == SC_OK;
        printf("push finished rc=%d\n", rc);
        int n = sc_push_replica_count(push);
        for (int i = 0; i < n; i++) {
            sc_replica_result r;
            char text[256];
            sc_push_replica_result(push, (size_t)i, &r, text, sizeof text);
            printf("replica %d: %s status=%d error=%d\n", i, text, r.status, r.error);
            ok = ok && r.status == SC_REPLICA_PUBLISHED;
        }
        /* Nothing died mid-push: the chain was never repaired. */
        int repairs = sc_push_repairs(push);
        printf("repairs=%d\n", repairs);
        ok = ok && repairs == 0;
    } else if (strcmp(mode, "cancel") == 0) {
        print_error("push ended", rc);
        ok = cancelled && rc == SC_ERR_CANCELLED;
    } else {
        print_error("push ended", rc);
        ok = rc == SC_ERR_UNREACHABLE;
    }
    /* A NULL handle is an error, not a crash. */
    if (sc_push_poll(NULL, NULL) != SC_ERR_INVALID_ARG) ok = 0;
    sc_push_free(push);
    free(weights);
    if (server) sc_server_stop(server);
    printf("%s\n", ok ? "OK" : "UNEXPECTED");
    return ok ? 0 : 1;
}
