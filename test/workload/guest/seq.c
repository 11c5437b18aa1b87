/*
 * ftvm-seq: the client whose acknowledged commits the failover check counts on.
 *
 *   ftvm-seq <interval-ms>      (stdout: the serial console, opened by the caller)
 *
 * Inserts n = max(seq.n)+1, +2, … into table `seq` of database `bench`, one autocommitted
 * transaction each (synchronous_commit on: the commit returns only once its WAL is flushed), and
 * only after PostgreSQL acknowledged the commit writes "FTVM-ACK <n>" — one write(2) per line, so
 * lines from other writers on the console never split it. A failed insert writes
 * "FTVM-WL seq-error n=<n> <message>", waits a second and tries the same n again (after
 * reconnecting if the connection is gone); a duplicate key there would mean the disk holds a
 * commit this process never saw acknowledged. Connection: libpq's environment (PGHOST, …).
 */
#include <errno.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void say(const char *line) {
  size_t len = strlen(line), done = 0;
  while (done < len) {
    ssize_t n = write(STDOUT_FILENO, line + done, len - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    done += (size_t)n;
  }
}

/* "FTVM-WL seq-error <what> <message>" on one line: libpq's messages end in (and may hold) newlines. */
static void say_error(const char *what, const char *message) {
  char line[640];
  snprintf(line, sizeof line - 1, "FTVM-WL seq-error %s %s", what, message);
  for (char *c = line; *c; c++)
    if (*c == '\n' || *c == '\r') *c = ' ';
  strcat(line, "\n");
  say(line);
}

static void sleep_ms(long ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

static PGconn *connect_db(void) {
  for (;;) {
    PGconn *conn = PQconnectdb("dbname=bench");
    if (PQstatus(conn) == CONNECTION_OK) return conn;
    say_error("connect", PQerrorMessage(conn));
    PQfinish(conn);
    sleep_ms(1000);
  }
}

int main(int argc, char **argv) {
  char *end = NULL;
  long interval = argc == 2 ? strtol(argv[1], &end, 10) : -1;
  if (argc != 2 || *end != '\0' || interval < 0 || interval > 60000) {
    fprintf(stderr, "usage: ftvm-seq <interval-ms 0..60000>\n");
    return 2;
  }
  PGconn *conn = connect_db();
  PGresult *res = PQexec(conn, "SELECT coalesce(max(n), 0) + 1 FROM seq");
  if (PQresultStatus(res) != PGRES_TUPLES_OK) {
    say_error("start", PQresultErrorMessage(res));
    return 1;
  }
  long long n = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
  PQclear(res);
  char line[128], value[32];
  snprintf(line, sizeof line, "FTVM-WL seq-start n=%lld interval_ms=%ld\n", n, interval);
  say(line);
  for (;;) {
    snprintf(value, sizeof value, "%lld", n);
    const char *params[1] = {value};
    res = PQexecParams(conn, "INSERT INTO seq (n) VALUES ($1)", 1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) == PGRES_COMMAND_OK) {
      snprintf(line, sizeof line, "FTVM-ACK %lld\n", n);
      say(line);
      n++;
      PQclear(res);
      if (interval) sleep_ms(interval);
      continue;
    }
    snprintf(line, sizeof line, "n=%lld", n);
    say_error(line, PQresultErrorMessage(res));
    PQclear(res);
    if (PQstatus(conn) != CONNECTION_OK) {
      PQfinish(conn);
      conn = connect_db();
    }
    sleep_ms(1000);
  }
}
