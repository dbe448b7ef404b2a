// The demo: TIES-merge three small Llama-shaped experts into their base.
// `mergebuild init-demo` generates the models under specs/models/demo (no download).
local mb = import 'mergebuild.libsonnet';
local root = 'models/demo/';

mb.ties(
  base=root + 'base',
  models=[
    mb.model(root + 'math', { weight: 1.0, density: 0.5 }),
    mb.model(root + 'code', { weight: 0.8, density: [0.3, 0.6] }),  // a gradient over layers
    mb.model(root + 'chat', { weight: 0.6, density: mb.filtered({ self_attn: 0.2 }, 0.4) }),
  ],
  output='../out/demo',
  dtype='bfloat16',
)
