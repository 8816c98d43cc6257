/*-------------------------------------------------------------------------
 *
 * tier_math.c
 *		The tier market-delta math, and the numeric helpers the cycle's SQL
 *		uses to apply it.
 *
 *		delta_n = (market_n - pool_n) / pool_n		(0 when pool_n is 0)
 *
 * A completed investment multiplies a tier's value by (1 + delta); a
 * completed withdrawal multiplies its allocation by (1 - delta).  All of it
 * is numeric arithmetic: never floating point.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/numeric.h"
#include "utils/uuid.h"

#include "cm.h"

/* Decimal places kept by cm.product between factors. */
#define CM_FACTOR_SCALE 40

PG_FUNCTION_INFO_V1(cm_tier_delta);
PG_FUNCTION_INFO_V1(cm_factor_mul);
PG_FUNCTION_INFO_V1(cm_factor_pow);
PG_FUNCTION_INFO_V1(cm_try_uuid);
PG_FUNCTION_INFO_V1(cm_typmod_scale);
PG_FUNCTION_INFO_V1(cm_typmod_limit);

/*
 * check_tier_amount
 *		Reject a pool or market value the math cannot use.
 *
 * NaN and the infinities make every delta meaningless, and a negative pool
 * or market value has no meaning for a tier; all of them are the caller's
 * mistake, so they get 22023 and a hint rather than a silent NULL.
 */
static void
check_tier_amount(Numeric value, const char *what)
{
	if (numeric_is_nan(value) || numeric_is_inf(value))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be a finite number", what),
				 errdetail("The value given was %s.",
						   DatumGetCString(DirectFunctionCall1(numeric_out,
															   NumericGetDatum(value)))),
				 errhint("Pass a finite, non-negative amount.")));

	if (DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(value),
										  NumericGetDatum(int64_to_numeric(0)))) < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be negative", what),
				 errdetail("The value given was %s.",
						   DatumGetCString(DirectFunctionCall1(numeric_out,
															   NumericGetDatum(value)))),
				 errhint("Tier pool and market values are amounts of money, zero or more.")));
}

/*
 * cm_tier_delta(pool numeric, market numeric) returns numeric
 *		(market - pool) / pool, or 0 when pool is 0.
 *
 * A pool of 0 has no market movement to speak of, so its delta is 0 rather
 * than a division error: a completion then leaves the tier unchanged.
 */
Datum
cm_tier_delta(PG_FUNCTION_ARGS)
{
	Numeric		pool = PG_GETARG_NUMERIC(0);
	Numeric		market = PG_GETARG_NUMERIC(1);
	Numeric		zero = int64_to_numeric(0);

	check_tier_amount(pool, "pool value");
	check_tier_amount(market, "market value");

	if (DatumGetInt32(DirectFunctionCall2(numeric_cmp, NumericGetDatum(pool),
										  NumericGetDatum(zero))) == 0)
		PG_RETURN_NUMERIC(zero);

	/* trailing zeros say nothing: 0.05, not 0.05000000000000000000 */
	PG_RETURN_DATUM(DirectFunctionCall1(numeric_trim_scale,
										NumericGetDatum(numeric_div_opt_error(numeric_sub_opt_error(market, pool, NULL),
																			  pool, NULL))));
}

/*
 * round_factor
 *		A factor rounded to CM_FACTOR_SCALE decimal places.
 */
static Numeric
round_factor(Numeric value)
{
	return DatumGetNumeric(DirectFunctionCall2(numeric_round, NumericGetDatum(value),
											   Int32GetDatum(CM_FACTOR_SCALE)));
}

/*
 * cm_factor_mul(a numeric, b numeric) returns numeric
 *		a * b, rounded to CM_FACTOR_SCALE decimal places.
 *
 * The transition function of the cm.product aggregate, which compounds the
 * factors of several completions of one account in one cycle.  An exact
 * product would grow by the scale of a factor (about 20 digits) with every
 * completion; 40 decimal places are far beyond any column's scale and keep
 * the cost per completion constant.
 */
Datum
cm_factor_mul(PG_FUNCTION_ARGS)
{
	Numeric		product;

	product = numeric_mul_opt_error(PG_GETARG_NUMERIC(0), PG_GETARG_NUMERIC(1), NULL);
	PG_RETURN_NUMERIC(round_factor(product));
}

/*
 * cm_factor_pow(factor numeric, k bigint) returns numeric
 *		factor^k for k >= 0, by repeated squaring, each product kept to
 *		CM_FACTOR_SCALE decimal places.
 *
 * All the completions of one account and kind in one cycle use the same
 * factor (the deltas are taken at the start of the cycle), so compounding
 * them is a power: a count per account and a handful of multiplications,
 * not one multiplication per completion.
 */
Datum
cm_factor_pow(PG_FUNCTION_ARGS)
{
	Numeric		base = PG_GETARG_NUMERIC(0);
	int64		k = PG_GETARG_INT64(1);
	Numeric		result = int64_to_numeric(1);

	if (k < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("exponent must not be negative")));
	while (k > 0)
	{
		CHECK_FOR_INTERRUPTS();
		if (k & 1)
			result = round_factor(numeric_mul_opt_error(result, base, NULL));
		k >>= 1;
		if (k > 0)
			base = round_factor(numeric_mul_opt_error(base, base, NULL));
	}
	PG_RETURN_NUMERIC(result);
}

/*
 * hex_digit
 *		The value of one hexadecimal digit, either case; -1 for anything else.
 */
static inline int
hex_digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/*
 * cm_try_uuid(text) returns uuid
 *		The uuid a queue row's text stands for, or NULL when it is not one.
 *
 * A text is a uuid when PostgreSQL's uuid type reads it as one: 32
 * hexadecimal digits of either case, a hyphen allowed after any group of
 * four of them (but not after the last), the whole optionally in braces.
 * So 'BBBBBBBB-0000-...' and 'bbbbbbbb-0000-...' are the same uuid, as they
 * are to a uuid column; the cycle stores the canonical form (uuid_out's)
 * and treats two queue rows claiming one uuid, in whatever spellings, as a
 * conflict (cycle_sql.c).  Returning NULL instead of raising lets the cycle
 * send a malformed row to the dead-letter table and go on with the batch;
 * parsing here rather than calling uuid_in also spares the cost of an
 * error per bad row.
 */
Datum
cm_try_uuid(PG_FUNCTION_ARGS)
{
	text	   *t = PG_GETARG_TEXT_PP(0);
	const char *s = VARDATA_ANY(t);
	const char *end = s + VARSIZE_ANY_EXHDR(t);
	pg_uuid_t  *uuid;
	int			nibble;

	/* 32 digits, at most 7 hyphens and 2 braces */
	if (end - s < 32 || end - s > 41)
		PG_RETURN_NULL();
	if (*s == '{')
	{
		if (end[-1] != '}')
			PG_RETURN_NULL();
		s++;
		end--;
	}

	uuid = (pg_uuid_t *) palloc(sizeof(pg_uuid_t));
	for (nibble = 0; nibble < 32; nibble++)
	{
		int			v;

		if (s >= end || (v = hex_digit(*s++)) < 0)
			PG_RETURN_NULL();
		if (nibble % 2 == 0)
			uuid->data[nibble / 2] = (unsigned char) (v << 4);
		else
			uuid->data[nibble / 2] |= (unsigned char) v;
		/* one hyphen may follow each group of four digits but the last */
		if (nibble % 4 == 3 && nibble < 31 && s < end && *s == '-')
			s++;
	}
	if (s != end)
		PG_RETURN_NULL();
	PG_RETURN_UUID_P(uuid);
}

/*
 * cm_typmod_scale(typmod integer) returns integer
 *		The scale of a numeric(p,s) column given its atttypmod; NULL when the
 *		column is unconstrained numeric.
 *
 * The cycle rounds every amount it writes to the scale of the column it
 * goes to, so that the application's CHECK constraints (tiers sum to the
 * total) hold for the rounded values it computes itself.  The decoding
 * follows numeric's typmod layout: ((p << 16) | s) + VARHDRSZ, with s an
 * 11-bit signed field.
 */
Datum
cm_typmod_scale(PG_FUNCTION_ARGS)
{
	int32		typmod = PG_GETARG_INT32(0);

	if (typmod < (int32) VARHDRSZ)
		PG_RETURN_NULL();
	PG_RETURN_INT32((((typmod - VARHDRSZ) & 0x7ff) ^ 1024) - 1024);
}

/*
 * cm_typmod_limit(typmod integer) returns numeric
 *		For a numeric(p,s) column, 10^(p-s): the smallest magnitude that,
 *		rounded to s places, no longer fits.  NULL when unconstrained.
 *
 * The cycle compares each amount, once rounded to the column's scale, with
 * this limit, so that a value that does not fit is a dead letter rather
 * than an error that stops the batch.
 */
Datum
cm_typmod_limit(PG_FUNCTION_ARGS)
{
	int32		typmod = PG_GETARG_INT32(0);
	int32		precision;
	int32		scale;
	char		buf[32];

	if (typmod < (int32) VARHDRSZ)
		PG_RETURN_NULL();
	precision = ((typmod - VARHDRSZ) >> 16) & 0xffff;
	scale = (((typmod - VARHDRSZ) & 0x7ff) ^ 1024) - 1024;
	snprintf(buf, sizeof(buf), "1e%d", precision - scale);
	PG_RETURN_DATUM(DirectFunctionCall3(numeric_in, CStringGetDatum(buf),
										ObjectIdGetDatum(InvalidOid), Int32GetDatum(-1)));
}
