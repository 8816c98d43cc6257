/*
 * Statistics per database.
 *
 * cm_stats() keeps its 1.0 columns but counts the cycles of the database it
 * is called in, so that a cycle in a staging database never moves the
 * counters or the failure streak of the worker's database; its worker
 * columns are the worker's, the same in every database.
 */

COMMENT ON FUNCTION @extschema@.cm_stats() IS 'counters of this database''s sync cycles since the server started (NULL when every consistency_manager.max_databases slot was taken), and the state of the worker of consistency_manager.database';
