# consistency_manager -- PGXS build, plus the entry points for the demo, the
# test suites and the benchmark (each one a script in tools/ or bench/).

MODULE_big = consistency_manager
OBJS = \
	consistency_manager.o \
	src/cycle.o \
	src/cycle_sql.o \
	src/guc.o \
	src/stats.o \
	src/tier_math.o \
	src/util.o

EXTENSION = consistency_manager
DATA = consistency_manager--1.0.sql
PGFILEDESC = "consistency_manager - portfolio/queue consistency worker"

PG_CPPFLAGS = -I$(srcdir)/src
PG_CFLAGS = -Wall -Wextra -Wno-unused-parameter

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

.PHONY: demo test bench

# The README's two commands, reachable from make as well.
demo:
	bash tools/demo.sh

test:
	bash tools/test.sh

bench:
	bash bench/run.sh
