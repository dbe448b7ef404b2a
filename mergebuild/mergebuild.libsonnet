// mergebuild.libsonnet: helpers that expand to the plain spec schema.
// Import with `local mb = import 'mergebuild.libsonnet';` (no path flag needed).
{
  // One input model: mb.model('models/math', { weight: 1.0, density: 0.2 }).
  model(path, parameters={}):: { path: path } + (if parameters == {} then {} else { parameters: parameters }),

  // A merge with any method; null fields are left out so defaults apply.
  merge(method, output, base=null, models=[], parameters={}, dtype=null, seed=null, budget=null, block_size=null, tokenizer=null)::
    std.prune({
      method: method,
      base: base,
      models: models,
      parameters: parameters,
      dtype: dtype,
      seed: seed,
      budget: budget,
      block_size: block_size,
      tokenizer: tokenizer,
      output: output,
    }),

  // Shorthands for the common methods.
  linear(models, output, parameters={}, dtype=null):: self.merge('linear', output, models=models, parameters=parameters, dtype=dtype),
  task_arithmetic(base, models, output, parameters={}, dtype=null):: self.merge('task_arithmetic', output, base, models, parameters, dtype),
  ties(base, models, output, parameters={}, dtype=null):: self.merge('ties', output, base, models, parameters, dtype),
  dare_ties(base, models, output, parameters={}, dtype=null, seed=null):: self.merge('dare_ties', output, base, models, parameters, dtype, seed),
  dare_linear(base, models, output, parameters={}, dtype=null, seed=null):: self.merge('dare_linear', output, base, models, parameters, dtype, seed),
  breadcrumbs(base, models, output, parameters={}, dtype=null):: self.merge('breadcrumbs', output, base, models, parameters, dtype),
  della(base, models, output, parameters={}, dtype=null, seed=null):: self.merge('della', output, base, models, parameters, dtype, seed),
  slerp(base, model, t, output, dtype=null):: self.merge('slerp', output, base, [model], { t: t }, dtype),

  // A parameter that applies only to tensors whose name contains `filter`,
  // with a fallback: mb.filtered({ self_attn: 0.3, mlp: 0.7 }, 0.5).
  filtered(rules, otherwise=null)::
    [{ filter: k, value: rules[k] } for k in std.objectFields(rules)]
    + (if otherwise == null then [] else [{ value: otherwise }]),

  // Several targets from one function: mb.sweep('w', [0.2, 0.5], function(v) ...).
  // Target names are prefix-<value> (numbers written with %g).
  sweep(prefix, values, make):: {
    targets: {
      [prefix + '-' + (if std.isNumber(v) then std.format('%g', v) else std.toString(v))]: make(v)
      for v in values
    },
  },
}
