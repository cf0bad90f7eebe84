/* Issue 14.3 evidence: what narrowing a receiver's RDMA access per grant costs on this device.
 *
 *   A. one region per slot:   ibv_reg_mr + ibv_dereg_mr of one SLOT-byte slot, per grant;
 *   B. a memory window (type 2) per grant over one region registered once: post IBV_WR_BIND_MW
 *      + wait for its completion (grant), post IBV_WR_LOCAL_INV + wait (release).
 * N of each, median / p10 / p90 in microseconds. Also: what the device says about memory
 * windows (max_mw, the MW capability bits), and whether the window really limits writes: an
 * RDMA WRITE through the window's rkey inside the bound slot must succeed, one just past it
 * must fail with a remote access error.
 *
 * Build (host or guest): gcc -O2 -o mw_vs_mr mw_vs_mr.c -libverbs
 * Run (guest):           ./mw_vs_mr DEV GID_INDEX [N=1000] [SLOT=4194304]
 * The queue pair is connected to itself (rxe loops the packets back through its responder). */
#include <infiniband/verbs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}
static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}
static void report(const char *what, double *v, int n) {
    qsort(v, n, sizeof *v, cmp);
    printf("%-44s median %9.1f us   p10 %9.1f   p90 %9.1f   (n=%d)\n", what, v[n / 2], v[n / 10], v[n * 9 / 10], n);
}
#define DIE(...) do { fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); exit(1); } while (0)

static struct ibv_wc wait_one(struct ibv_cq *cq) {
    struct ibv_wc wc;
    int n;
    while ((n = ibv_poll_cq(cq, 1, &wc)) == 0) {}
    if (n < 0) DIE("ibv_poll_cq failed");
    return wc;
}

/* Connects an RC queue pair to itself: INIT -> RTR -> RTS. */
static void connect_self(struct ibv_qp *qp, union ibv_gid *gidp, int gidx, enum ibv_mtu mtu, int acc) {
    union ibv_gid gid = *gidp;
    struct ibv_qp_attr qa = {.qp_state = IBV_QPS_INIT, .port_num = 1, .qp_access_flags = acc};
    if (ibv_modify_qp(qp, &qa, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS)) DIE("INIT");
    memset(&qa, 0, sizeof qa);
    qa.qp_state = IBV_QPS_RTR; qa.path_mtu = mtu; qa.dest_qp_num = qp->qp_num; qa.rq_psn = 1;
    qa.max_dest_rd_atomic = 1; qa.min_rnr_timer = 12; qa.ah_attr.is_global = 1; qa.ah_attr.port_num = 1;
    qa.ah_attr.grh.dgid = gid; qa.ah_attr.grh.sgid_index = gidx; qa.ah_attr.grh.hop_limit = 64;
    if (ibv_modify_qp(qp, &qa, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                                   IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER)) DIE("RTR");
    memset(&qa, 0, sizeof qa);
    qa.qp_state = IBV_QPS_RTS; qa.sq_psn = 1; qa.timeout = 14; qa.retry_cnt = 7; qa.rnr_retry = 7; qa.max_rd_atomic = 1;
    if (ibv_modify_qp(qp, &qa, IBV_QP_STATE | IBV_QP_SQ_PSN | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
                                   IBV_QP_MAX_QP_RD_ATOMIC)) DIE("RTS");
}

int main(int argc, char **argv) {
    if (argc < 3) DIE("usage: %s DEV GID_INDEX [N] [SLOT]", argv[0]);
    const char *devname = argv[1];
    int gidx = atoi(argv[2]);
    int n = argc > 3 ? atoi(argv[3]) : 1000;
    size_t slot = argc > 4 ? strtoull(argv[4], 0, 0) : (4u << 20);
    const int slots = 4;

    int nd;
    struct ibv_device **list = ibv_get_device_list(&nd);
    struct ibv_context *ctx = NULL;
    for (int i = 0; list && i < nd; i++)
        if (!strcmp(ibv_get_device_name(list[i]), devname)) ctx = ibv_open_device(list[i]);
    if (!ctx) DIE("no device %s", devname);
    struct ibv_device_attr da;
    if (ibv_query_device(ctx, &da)) DIE("ibv_query_device");
    printf("device %s: max_mw %d, max_mr %d, cap MEM_WINDOW %d, TYPE_2A %d, TYPE_2B %d\n", devname, da.max_mw,
           da.max_mr, !!(da.device_cap_flags & IBV_DEVICE_MEM_WINDOW),
           !!(da.device_cap_flags & IBV_DEVICE_MEM_WINDOW_TYPE_2A), !!(da.device_cap_flags & IBV_DEVICE_MEM_WINDOW_TYPE_2B));

    struct ibv_pd *pd = ibv_alloc_pd(ctx);
    size_t len = slot * slots;
    char *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) DIE("mmap");
    memset(buf, 1, len);
    double *a = calloc(n, sizeof *a), *b = calloc(n, sizeof *b), *c = calloc(n, sizeof *c);

    /* A: a region per slot, registered at grant and deregistered at release. */
    int acc = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE;
    for (int i = 0; i < n; i++) {
        char *s = buf + (size_t)(i % slots) * slot;
        double t0 = now_us();
        struct ibv_mr *mr = ibv_reg_mr(pd, s, slot, acc);
        double t1 = now_us();
        if (!mr) DIE("ibv_reg_mr %zu bytes", slot);
        if (ibv_dereg_mr(mr)) DIE("ibv_dereg_mr");
        double t2 = now_us();
        a[i] = t1 - t0; b[i] = t2 - t1; c[i] = t2 - t0;
    }
    char what[96];
    snprintf(what, sizeof what, "A  ibv_reg_mr (%zu KiB)", slot >> 10); report(what, a, n);
    snprintf(what, sizeof what, "A  ibv_dereg_mr (%zu KiB)", slot >> 10); report(what, b, n);
    report("A  reg + dereg, per grant", c, n);

    /* B: one region with MW_BIND, a type-2 window bound per grant and invalidated on release. */
    struct ibv_mr *mr = ibv_reg_mr(pd, buf, len, acc | IBV_ACCESS_MW_BIND);
    if (!mr) DIE("ibv_reg_mr with IBV_ACCESS_MW_BIND failed: the device cannot bind windows");
    struct ibv_cq *cq = ibv_create_cq(ctx, 64, NULL, NULL, 0);
    struct ibv_qp_init_attr ia = {.send_cq = cq, .recv_cq = cq, .qp_type = IBV_QPT_RC,
                                  .cap = {.max_send_wr = 16, .max_recv_wr = 16, .max_send_sge = 1, .max_recv_sge = 1}};
    struct ibv_qp *qp = ibv_create_qp(pd, &ia);
    if (!qp) DIE("ibv_create_qp");
    union ibv_gid gid;
    if (ibv_query_gid(ctx, 1, gidx, &gid)) DIE("ibv_query_gid");
    struct ibv_port_attr pa;
    ibv_query_port(ctx, 1, &pa);
    connect_self(qp, &gid, gidx, pa.active_mtu, acc);
    struct ibv_mw *mw = ibv_alloc_mw(pd, IBV_MW_TYPE_2);
    if (!mw) { perror("ibv_alloc_mw(IBV_MW_TYPE_2)"); printf("type-2 memory windows: NOT supported\n"); return 0; }
    printf("type-2 memory window allocated: rkey 0x%x\n", mw->rkey);
    uint32_t rkey = mw->rkey;
    struct ibv_send_wr wr, *bad;
    for (int i = 0; i < n; i++) {
        char *s = buf + (size_t)(i % slots) * slot;
        rkey = ibv_inc_rkey(rkey);
        memset(&wr, 0, sizeof wr);
        wr.wr_id = 1; wr.opcode = IBV_WR_BIND_MW; wr.send_flags = IBV_SEND_SIGNALED;
        wr.bind_mw.mw = mw; wr.bind_mw.rkey = rkey;
        wr.bind_mw.bind_info = (struct ibv_mw_bind_info){.mr = mr, .addr = (uint64_t)s, .length = slot,
                                                          .mw_access_flags = IBV_ACCESS_REMOTE_WRITE};
        double t0 = now_us();
        if (ibv_post_send(qp, &wr, &bad)) DIE("post BIND_MW");
        struct ibv_wc wc = wait_one(cq);
        double t1 = now_us();
        if (wc.status) DIE("BIND_MW completion (grant %d): %s", i, ibv_wc_status_str(wc.status));
        /* A type-2 window's key is the one its last bind gave it; libibverbs tracks it only for
         * type 1 (ibv_bind_mw), and rxe checks the bind's mw_rkey against it. */
        mw->rkey = rkey;
        memset(&wr, 0, sizeof wr);
        wr.wr_id = 2; wr.opcode = IBV_WR_LOCAL_INV; wr.send_flags = IBV_SEND_SIGNALED; wr.invalidate_rkey = rkey;
        if (ibv_post_send(qp, &wr, &bad)) DIE("post LOCAL_INV");
        wc = wait_one(cq);
        double t2 = now_us();
        if (wc.status) DIE("LOCAL_INV completion (grant %d): %s", i, ibv_wc_status_str(wc.status));
        a[i] = t1 - t0; b[i] = t2 - t1; c[i] = t2 - t0;
    }
    report("B  bind type-2 MW (post + completion)", a, n);
    report("B  local invalidate (post + completion)", b, n);
    report("B  bind + invalidate, per grant", c, n);

    /* Does the window limit writes? Each check on a fresh queue pair and window (a refused
     * write moves the QP to the error state; a type-2B window belongs to the QP that bound it). */
    struct ibv_mr *slot_mr = ibv_reg_mr(pd, buf + slot, slot, acc | IBV_ACCESS_MW_BIND);
    if (!slot_mr) DIE("ibv_reg_mr of one slot");
    struct { const char *what; struct ibv_mr *under; char *at; int invalidate; } checks[] = {
        {"window over the whole-pool region, write inside the window", mr, buf + slot, 0},
        {"window over the whole-pool region, write just past the window", mr, buf + 2 * slot, 0},
        {"window over a one-slot region, write inside the window", slot_mr, buf + slot, 0},
        {"window over a one-slot region, write just past the window", slot_mr, buf + 2 * slot, 0},
        {"window over a one-slot region, write after its local invalidate", slot_mr, buf + slot, 1},
    };
    for (unsigned k = 0; k < sizeof checks / sizeof checks[0]; k++) {
        struct ibv_qp *q = ibv_create_qp(pd, &ia);
        if (!q) DIE("ibv_create_qp");
        connect_self(q, &gid, gidx, pa.active_mtu, acc);
        struct ibv_mw *w = ibv_alloc_mw(pd, IBV_MW_TYPE_2);
        if (!w) DIE("ibv_alloc_mw");
        uint32_t key = ibv_inc_rkey(w->rkey);
        memset(&wr, 0, sizeof wr);
        wr.opcode = IBV_WR_BIND_MW; wr.send_flags = IBV_SEND_SIGNALED; wr.bind_mw.mw = w; wr.bind_mw.rkey = key;
        wr.bind_mw.bind_info = (struct ibv_mw_bind_info){.mr = checks[k].under, .addr = (uint64_t)(buf + slot),
                                                          .length = slot, .mw_access_flags = IBV_ACCESS_REMOTE_WRITE};
        if (ibv_post_send(q, &wr, &bad)) DIE("post bind for a check");
        struct ibv_wc wc = wait_one(cq);
        if (wc.status) DIE("bind for a check: %s", ibv_wc_status_str(wc.status));
        w->rkey = key;
        if (checks[k].invalidate) {
            memset(&wr, 0, sizeof wr);
            wr.opcode = IBV_WR_LOCAL_INV; wr.send_flags = IBV_SEND_SIGNALED; wr.invalidate_rkey = key;
            if (ibv_post_send(q, &wr, &bad) || wait_one(cq).status) DIE("invalidate for a check");
        }
        struct ibv_sge sge = {.addr = (uint64_t)buf, .length = 4096, .lkey = mr->lkey};
        memset(&wr, 0, sizeof wr);
        wr.opcode = IBV_WR_RDMA_WRITE; wr.send_flags = IBV_SEND_SIGNALED; wr.sg_list = &sge; wr.num_sge = 1;
        wr.wr.rdma.remote_addr = (uint64_t)checks[k].at; wr.wr.rdma.rkey = key;
        if (ibv_post_send(q, &wr, &bad)) DIE("post WRITE");
        wc = wait_one(cq);
        printf("check: %-62s -> %s\n", checks[k].what, ibv_wc_status_str(wc.status));
    }
    return 0;
}
