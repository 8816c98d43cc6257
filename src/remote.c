/*-------------------------------------------------------------------------
 *
 * remote.c
 *		Keep every wait on queue-db bounded and interruptible in the worker.
 *
 * The cycle reads queue-db through postgres_fdw.  A remote that stops
 * answering (a frozen server, a hung pooler) must never hang the worker, a
 * fast shutdown, or pg_terminate_backend():
 *
 *	 - connecting is bounded by the foreign server's connect_timeout, which
 *	   cm_attach_queue() sets (libpq's connection establishment cannot be
 *	   interrupted);
 *	 - a query waiting for its result can be interrupted, but on PostgreSQL
 *	   15 postgres_fdw then sends a cancel request with PQcancel(), which
 *	   opens a new connection to the remote and waits, without any time
 *	   limit, for the remote postmaster to close it.  A frozen remote never
 *	   does, so a plain die() or statement timeout hangs the worker in its
 *	   abort processing.
 *
 * So in the worker, SIGTERM and the cycle deadline
 * (consistency_manager.cycle_timeout) first shut down the worker's own
 * connections to remote servers.  libpq then sees end-of-file: the waiting
 * read fails at once with a connection error, the connection is marked bad,
 * and postgres_fdw's abort processing skips the cancel request and the
 * remote ABORT.  While the cycle is reading queue-db nothing else is done:
 * the failed read ends the cycle, and the worker then exits (SIGTERM) or
 * reports the deadline.  Elsewhere the usual interrupt follows (die(), or a
 * query cancel for the deadline), and finds no live remote to wait for.
 *
 * Everything called from the handlers is async-signal-safe: plain system
 * calls over the process's file descriptors.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include "miscadmin.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/timeout.h"

#include "cm.h"

/* Set while the cycle reads queue-db (cm_remote_read_begin/end). */
static volatile sig_atomic_t remote_read_active = false;

/* Set by SIGTERM during a remote read: exit once the read has failed. */
static volatile sig_atomic_t exit_requested = false;

/* Set when the cycle deadline expired. */
static volatile sig_atomic_t deadline_expired = false;

/* Highest file descriptor number to look at, read once at start. */
static int	max_fd = 1024;

static TimeoutId deadline_timeout = MAX_TIMEOUTS;

/*
 * shutdown_remote_sockets
 *		Shut down every connected TCP or Unix-domain stream socket of this
 *		process.  Returns the number shut down.
 *
 * In the worker (a background worker with no client) those are exactly
 * postgres_fdw's connections to queue-db: the postmaster's listen sockets
 * are closed in its children, and latches and the postmaster-death
 * watch use pipes or descriptors of other kinds.  Async-signal-safe.
 */
static int
shutdown_remote_sockets(void)
{
	int			fd;
	int			n = 0;

	for (fd = 0; fd < max_fd; fd++)
	{
		int			type;
		socklen_t	len = sizeof(type);
		struct sockaddr_storage peer;
		socklen_t	plen = sizeof(peer);

		if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM)
			continue;
		if (getpeername(fd, (struct sockaddr *) &peer, &plen) != 0)
			continue;
		if (peer.ss_family != AF_INET && peer.ss_family != AF_INET6 && peer.ss_family != AF_UNIX)
			continue;
		if (shutdown(fd, SHUT_RDWR) == 0)
			n++;
	}
	return n;
}

/*
 * cm_worker_sigterm
 *		SIGTERM handler of the worker (pg_terminate_backend, fast shutdown).
 *
 * Drops the remote connections first (see the file header), then either
 * lets the failing remote read end the cycle (the worker exits right
 * after, cm_remote_check_exit) or interrupts as die() does.
 */
void
cm_worker_sigterm(SIGNAL_ARGS)
{
	int			save_errno = errno;

	(void) shutdown_remote_sockets();
	if (remote_read_active)
	{
		exit_requested = true;
		SetLatch(MyLatch);
	}
	else
		die(postgres_signal_arg);
	errno = save_errno;
}

/*
 * deadline_handler
 *		The cycle deadline expired: end the cycle, as cm_worker_sigterm
 *		ends the worker.
 */
static void
deadline_handler(void)
{
	int			save_errno = errno;

	deadline_expired = true;
	(void) shutdown_remote_sockets();
	if (!remote_read_active)
	{
		QueryCancelPending = true;
		InterruptPending = true;
	}
	SetLatch(MyLatch);
	errno = save_errno;
}

/*
 * cm_remote_init_worker
 *		Prepare the worker's handling of remote waits: the descriptor range
 *		to scan and the deadline timer.  Called once at worker start.
 */
void
cm_remote_init_worker(void)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
		max_fd = (int) Min(rl.rlim_cur, (rlim_t) 65536);
	deadline_timeout = RegisterTimeout(USER_TIMEOUT, deadline_handler);
}

/*
 * cm_cycle_deadline_start / cm_cycle_deadline_stop
 *		Arm the worker's cycle deadline (consistency_manager.cycle_timeout,
 *		0 = none) for the cycle that starts, and disarm it after.
 */
void
cm_cycle_deadline_start(void)
{
	deadline_expired = false;
	if (deadline_timeout != MAX_TIMEOUTS && cm_cycle_timeout > 0)
		enable_timeout_after(deadline_timeout, cm_cycle_timeout);
}

void
cm_cycle_deadline_stop(void)
{
	if (deadline_timeout != MAX_TIMEOUTS)
		disable_timeout(deadline_timeout, false);
}

/*
 * cm_cycle_deadline_expired
 *		Whether the last cycle ended because its deadline expired.
 */
bool
cm_cycle_deadline_expired(void)
{
	return deadline_expired;
}

/*
 * cm_remote_read_begin / cm_remote_read_end
 *		Bracket the cycle's reads of queue-db (see cm_worker_sigterm).
 *		cm_remote_read_end is also called when a read fails.
 */
void
cm_remote_read_begin(void)
{
	remote_read_active = true;
}

void
cm_remote_read_end(void)
{
	remote_read_active = false;
}

/*
 * cm_remote_check_exit
 *		Exit as die() would, when SIGTERM arrived during a remote read.
 *		Called by the worker after each cycle.
 */
void
cm_remote_check_exit(void)
{
	if (exit_requested)
	{
		ProcDiePending = true;
		InterruptPending = true;
		CHECK_FOR_INTERRUPTS();
	}
}

/*
 * cm_remote_exit_requested
 *		Whether SIGTERM came during a remote read: the error the read then
 *		gets must end the cycle, not only the source it was reading.
 */
bool
cm_remote_exit_requested(void)
{
	return exit_requested;
}
