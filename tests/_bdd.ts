// The node:test API (describe, it, hooks) for test files that run under both
// Deno and Bun. Bun gets node:test itself. Deno's node:test turns its
// sanitizers off, so under Deno each top-level describe() becomes one
// Deno.test with its sanitizers on: every timer, op and socket the suite
// opens must be closed by its end. Each it() is a step of that test.

import * as nodeTest from "node:test";

type Fn = () => unknown;
type Hook = () => unknown;

interface Case {
  name: string;
  fn: Fn;
}

/** Deno test options a top-level describe() may relax, for leaks a client library makes. */
export interface SuiteOptions {
  sanitizeOps?: boolean;
  sanitizeResources?: boolean;
}

interface Suite {
  name: string;
  options: SuiteOptions;
  children: (Case | Suite)[];
  before: Hook[];
  after: Hook[];
  beforeEach: Hook[];
  afterEach: Hook[];
}

const deno = (globalThis as { Deno?: typeof Deno }).Deno;
let current: Suite | undefined;
/** TEST_FILTER=regex runs only the matching tests (Deno; Bun has --test-name-pattern). */
const only = deno?.env.get("TEST_FILTER");
const filter = only ? new RegExp(only) : undefined;

function hookOf(kind: "before" | "after" | "beforeEach" | "afterEach") {
  return (fn: Hook) => {
    if (current === undefined) throw new Error(`${kind}() must be called inside describe()`);
    current[kind].push(fn);
  };
}

async function runSuite(
  suite: Suite,
  t: Deno.TestContext,
  outer: Suite[],
  title = "",
): Promise<void> {
  const chain = [...outer, suite];
  for (const hook of suite.before) await hook();
  try {
    for (const child of suite.children) {
      if ("children" in child) {
        // A nested group's tests become steps of the top-level test, so the
        // step count is the count of tests, as under Bun.
        await runSuite(child, t, chain, `${title}${child.name} > `);
        continue;
      }
      if (filter && !filter.test(`${suite.name} > ${title}${child.name}`)) continue;
      const step = async () => {
        for (const s of chain) for (const hook of s.beforeEach) await hook();
        try {
          await child.fn();
        } finally {
          for (const s of [...chain].reverse()) for (const hook of s.afterEach) await hook();
        }
      };
      // The suite as a whole is sanitized; a step may leave a locker open for a later one.
      await t.step({
        name: `${title}${child.name}`,
        fn: step,
        sanitizeOps: false,
        sanitizeResources: false,
        sanitizeExit: false,
      });
    }
  } finally {
    for (const hook of suite.after) await hook();
  }
}

function denoDescribe(
  name: string,
  optionsOrFn: SuiteOptions | (() => void),
  body?: () => void,
): void {
  const options = typeof optionsOrFn === "function" ? {} : optionsOrFn;
  const fn = typeof optionsOrFn === "function" ? optionsOrFn : body!;
  const suite: Suite = {
    name,
    options,
    children: [],
    before: [],
    after: [],
    beforeEach: [],
    afterEach: [],
  };
  const parent = current;
  parent?.children.push(suite);
  current = suite;
  try {
    fn();
  } finally {
    current = parent;
  }
  if (parent === undefined) {
    deno!.test({ name, ...suite.options, fn: (t) => runSuite(suite, t, []) });
  }
}

function denoIt(name: string, fn: Fn): void {
  if (current === undefined) deno!.test({ name, fn: async () => void await fn() });
  else current.children.push({ name, fn });
}

/**
 * Groups tests; under Deno, a top-level group is one sanitized test. Options
 * (Deno only) relax a sanitizer for a group, and must say why where used.
 */
export const describe: {
  (name: string, fn: () => void): void;
  (name: string, options: SuiteOptions, fn: () => void): void;
} = deno
  ? denoDescribe
  : (name: string, a: SuiteOptions | (() => void), b?: () => void) =>
    void nodeTest.describe(name, typeof a === "function" ? a : b!);
/** One test. */
export const it: (name: string, fn: Fn) => void = deno
  ? denoIt
  : (name, fn) => void nodeTest.it(name, async () => void await fn());
/** Runs once before the group's tests. */
export const before: (fn: Hook) => void = deno ? hookOf("before") : (fn) => nodeTest.before(fn);
/** Runs once after the group's tests. */
export const after: (fn: Hook) => void = deno ? hookOf("after") : (fn) => nodeTest.after(fn);
/** Runs before each test in the group. */
export const beforeEach: (fn: Hook) => void = deno
  ? hookOf("beforeEach")
  : (fn) => nodeTest.beforeEach(fn);
/** Runs after each test in the group. */
export const afterEach: (fn: Hook) => void = deno
  ? hookOf("afterEach")
  : (fn) => nodeTest.afterEach(fn);
