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
 * cm_try_uuid(text) returns uuid
 *		The uuid a queue row's text stands for, or NULL when it is malformed.
 *
 * Only the canonical form is accepted: 8-4-4-4-12 lower-case hexadecimal
 * digits, as the queue services (and uuid_out) write it.  Refusing the other
 * spellings uuid_in tolerates (upper case, braces, no hyphens) keeps "one
 * text, one uuid" true, so the queue's unique constraint on the text stays a
 * unique constraint on the uuid: two rows can never claim one transaction.  Returning NULL instead of raising lets the cycle send the row to the
 * dead-letter table and go on with the batch.
 */
Datum
cm_try_uuid(PG_FUNCTION_ARGS)
{
	text	   *t = PG_GETARG_TEXT_PP(0);
	const char *s = VARDATA_ANY(t);
	pg_uuid_t  *uuid;
	int			i;
	int			nibbles = 0;

	if (VARSIZE_ANY_EXHDR(t) != 36)
		PG_RETURN_NULL();

	/* parsed here rather than by uuid_in: this runs for every row read */
	uuid = (pg_uuid_t *) palloc(sizeof(pg_uuid_t));
	for (i = 0; i < 36; i++)
	{
		char		c = s[i];
		int			v;

		if (i == 8 || i == 13 || i == 18 || i == 23)
		{
			if (c != '-')
				PG_RETURN_NULL();
			continue;
		}
		if (c >= '0' && c <= '9')
			v = c - '0';
		else if (c >= 'a' && c <= 'f')
			v = c - 'a' + 10;
		else
			PG_RETURN_NULL();
		if (nibbles % 2 == 0)
			uuid->data[nibbles / 2] = (unsigned char) (v << 4);
		else
			uuid->data[nibbles / 2] |= (unsigned char) v;
		nibbles++;
	}
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
