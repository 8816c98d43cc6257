/*
 * The launcher: the background worker registered at server start connects
 * to no database, waits for consistency_manager.database to exist and
 * starts the sync worker in it.
 *
 * cm_worker_stop() and cm_worker_start() keep their 1.0 signatures; they
 * now switch syncing off and on through the launcher, also while the
 * database does not exist yet.
 */

COMMENT ON FUNCTION @extschema@.cm_worker_stop() IS 'stop the sync worker, and start none, until cm_worker_start() or a server restart; false when already stopped';
COMMENT ON FUNCTION @extschema@.cm_worker_start() IS 'undo cm_worker_stop() and have the launcher start the sync worker now, once its database exists; false when one already runs';
