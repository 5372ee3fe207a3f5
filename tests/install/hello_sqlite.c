/* The smallest user of an installed libcancel-sqlite: built by run.sh
 * against the installed headers and libraries, with pkg-config and with
 * find_package(cancel).  A statement given a token that already fired
 * does not run; with no token it is the plain SQLite call. */
#include <cancel/sqlite.h>

#include <stdio.h>

int main(void) {
  sqlite3 *db;
  cancel_source *src;
  int rc;

  if (sqlite3_open(":memory:", &db) != SQLITE_OK) {
    fprintf(stderr, "sqlite3_open failed\n");
    return 1;
  }
  if ((rc = cancel_sqlite_exec(NULL, db, "CREATE TABLE t(x)")) != 0) {
    fprintf(stderr, "CREATE TABLE: %s\n", cancel_strerror(rc));
    sqlite3_close(db);
    return 1;
  }
  if (cancel_source_new(&src, "hello") != 0) {
    fprintf(stderr, "cancel_source_new failed\n");
    sqlite3_close(db);
    return 1;
  }
  cancel_source_cancel(src);
  rc = cancel_sqlite_exec(cancel_source_token(src), db,
                          "INSERT INTO t VALUES (1)");
  cancel_source_unref(src);
  if (rc != -ECANCELED) {
    fprintf(stderr, "cancelled INSERT returned %d, not -ECANCELED\n", rc);
    sqlite3_close(db);
    return 1;
  }
  /* Nothing ran: the table is still empty. */
  sqlite3_stmt *stmt;
  int rows = -1;
  if (cancel_sqlite_prepare(NULL, db, "SELECT count(*) FROM t", -1, &stmt,
                            NULL) == 0) {
    if (cancel_sqlite_step(NULL, stmt) == 1)
      rows = sqlite3_column_int(stmt, 0);
    sqlite3_finalize(stmt);
  }
  sqlite3_close(db);
  if (rows != 0) {
    fprintf(stderr, "the cancelled INSERT ran (%d rows)\n", rows);
    return 1;
  }
  printf("OK\n");
  return 0;
}
