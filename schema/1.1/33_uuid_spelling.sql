/*
 * A queue uuid is what PostgreSQL's uuid type reads as one.
 *
 * 1.0 accepted only the lower-case 8-4-4-4-12 form and dead-lettered
 * 'BBBBBBBB-0000-...' as malformed, although a uuid column takes it as the
 * same uuid as 'bbbbbbbb-0000-...'.  cm.try_uuid (src/tier_math.c) now reads
 * every spelling uuid_in reads (either case, braces, hyphens after any group
 * of four digits or none); the transaction gets the canonical form.  Two
 * queue rows with different queue_ids that claim one uuid, in whatever
 * spellings, are a conflict: the first claim applies, the others are
 * dead-lettered naming it (src/cycle_sql.c).
 */

COMMENT ON FUNCTION cm.try_uuid(text) IS 'the uuid a queue row''s text stands for, in any spelling PostgreSQL''s uuid type reads (either case, braces, hyphens after any group of four digits or none), or NULL when the text is not one';
