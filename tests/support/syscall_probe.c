/* Tries one system call the vault's seccomp filter must stop, and prints
 * what the kernel answered: "<result> <errno>". Run inside a process that
 * installed the filter (tests/test_review.py), and once outside as the
 * control. A process the filter kills prints nothing. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_io_uring_setup
#define SYS_io_uring_setup 425
#endif

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    if (!strcmp(argv[1], "i386-socket")) {
#if defined(__x86_64__)
        /* The i386 ABI from 64-bit code: socket(AF_INET, SOCK_STREAM, 0) is
         * system call 359 there (not 41), and seccomp sees AUDIT_ARCH_I386. */
        long r;
        __asm__ volatile("int $0x80" : "=a"(r) : "a"(359L), "b"((long)AF_INET), "c"((long)SOCK_STREAM), "d"(0L)
                         : "memory");
        printf("%ld %ld\n", r, r < 0 ? -r : 0L);
        return 0;
#else
        puts("unsupported 0");
        return 3;
#endif
    }
    if (!strcmp(argv[1], "io_uring")) {
        unsigned char params[120]; /* struct io_uring_params, zeroed */
        memset(params, 0, sizeof params);
        long r = syscall(SYS_io_uring_setup, 4, params);
        printf("%ld %d\n", r, r < 0 ? errno : 0);
        return 0;
    }
    if (!strcmp(argv[1], "inet")) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        printf("%d %d\n", fd, fd < 0 ? errno : 0);
        return 0;
    }
    return 2;
}
