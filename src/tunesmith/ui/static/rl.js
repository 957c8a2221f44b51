// tunesmith ui, objective grpo on a run's page: the reward curve beside the loss and the sample completions of the
// latest validation. Pure functions over metrics.jsonl records (no DOM), so that tests run them in node.
"use strict";

const rewards = {
  // What the page keeps: per train step its reward mean and std, per validation step its val_reward, and the latest
  // validation's sample completions.
  empty: () => ({ step: [], reward: [], std: [], val: new Map(), samples: null }),

  // One metrics record into the state; a resume that rewrites the tail replaces the steps it wrote again.
  add(state, r) {
    if (r.type === "val") {
      if (r.val_reward !== undefined) state.val.set(r.step, r.val_reward);
      if (Array.isArray(r.val_samples) && r.val_samples.length) state.samples = { step: r.step, items: r.val_samples };
      return;
    }
    if ((r.type || "train") !== "train") return;
    while (state.step.length && state.step[state.step.length - 1] >= r.step) {
      state.step.pop(); state.reward.pop(); state.std.pop();
    }
    state.step.push(r.step); state.reward.push(r.reward ?? null); state.std.push(r.reward_std ?? null);
  },

  // Whether the run logged any reward (a grpo run): only then is the chart drawn.
  seen: (state) => state.reward.some((v) => v !== null) || state.val.size > 0,

  // uPlot's columns: the steps, the train reward mean, mean ± std, and the validation reward at its steps.
  chartData(state) {
    const steps = [...new Set([...state.step, ...state.val.keys()])].sort((a, b) => a - b);
    const at = new Map(state.step.map((s, i) => [s, i]));
    const col = (f) => steps.map((s) => (at.has(s) ? f(at.get(s)) : null));
    const band = (sign) => col((i) => (state.reward[i] === null || state.std[i] === null ? null : state.reward[i] + sign * state.std[i]));
    return [steps, col((i) => state.reward[i]), band(-1), band(1), steps.map((s) => state.val.get(s) ?? null)];
  },

  // The sample completions as table rows: prompt, completion, reward ("skipped" where a reward skipped it).
  sampleRows: (state) => (state.samples ? state.samples.items.map((s) => [s.prompt, s.completion, s.reward === null || s.reward === undefined ? "skipped" : s.reward]) : []),
};

if (typeof module !== "undefined") module.exports = rewards;
