// Unit tests of foreign.ts: another page's execution rendered into its cell.
import { strict as assert } from 'node:assert';
import { test } from 'node:test';

import { ForeignOutputs, ICellLike } from '../foreign';

/** JupyterLab's output model, as far as foreign.ts uses it (streams merged, clear(wait)). */
class Outputs {
  items: any[] = [];
  private _clearNext = false;
  add(o: any): number {
    if (this._clearNext) {
      this.items = [];
      this._clearNext = false;
    }
    const last = this.items[this.items.length - 1];
    if (o.output_type === 'stream' && last?.output_type === 'stream' && last.name === o.name) {
      last.text += o.text;
    } else {
      this.items.push({ ...o });
    }
    return this.items.length;
  }
  clear(wait = false): void {
    if (wait) this._clearNext = true;
    else this.items = [];
  }
}

function cell(): ICellLike & { outputs: Outputs } {
  return { outputs: new Outputs(), executionCount: 3 };
}

function msg(type: string, parent: string, content: any, metadata: any = {}) {
  return {
    header: { msg_id: `${type}-${Math.random()}`, msg_type: type },
    parent_header: { msg_id: parent },
    metadata,
    content
  };
}

test("another page's execution goes to its cell, its unmarked live messages too", () => {
  const c = cell();
  c.outputs.add({ output_type: 'stream', name: 'stdout', text: 'old run\n' });
  const f = new ForeignOutputs(id => (id === 'cell-a' ? c : null));
  const mark = { chspawner_cell: 'cell-a', chspawner_seq: 1 };
  assert.equal(f.received(msg('execute_input', 'r1', { execution_count: 7 }, mark)), true);
  assert.equal(c.executionCount, 7);
  assert.deepEqual(c.outputs.items, []); // the run starts afresh, as in JupyterLab
  f.received(msg('stream', 'r1', { name: 'stdout', text: '1\n' }, mark));
  f.received(msg('stream', 'r1', { name: 'stdout', text: '2\n' })); // live: no mark
  f.received(msg('execute_result', 'r1', { data: { 'text/plain': '42' }, metadata: {}, execution_count: 7 }));
  f.received(msg('error', 'r1', { ename: 'E', evalue: 'v', traceback: ['t'] }));
  assert.deepEqual(c.outputs.items, [
    { output_type: 'stream', name: 'stdout', text: '1\n2\n' },
    { output_type: 'execute_result', data: { 'text/plain': '42' }, metadata: {}, execution_count: 7 },
    { output_type: 'error', ename: 'E', evalue: 'v', traceback: ['t'] }
  ]);
});

test('output resumed mid-run is appended to what the saved notebook holds', () => {
  const c = cell();
  c.outputs.add({ output_type: 'stream', name: 'stdout', text: '1\n' });
  const f = new ForeignOutputs(() => c);
  f.received(msg('stream', 'r1', { name: 'stdout', text: '2\n' }, { chspawner_cell: 'x' }));
  assert.deepEqual(c.outputs.items, [{ output_type: 'stream', name: 'stdout', text: '1\n2\n' }]);
});

test('a page that joined mid-run gets the count from the marked replay', () => {
  const c = cell();
  c.executionCount = null;
  const f = new ForeignOutputs(() => c);
  const mark = { chspawner_cell: 'x', chspawner_seq: 5, chspawner_count: 12 };
  f.received(msg('stream', 'r1', { name: 'stdout', text: '4\n' }, mark));
  assert.equal(c.executionCount, 12);
  c.executionCount = null;
  assert.equal(f.received(msg('status', 'r1', { execution_state: 'idle' }, mark)), true);
  assert.equal(c.executionCount, 12);
});

test("this page's own requests and unmarked messages are left to JupyterLab", () => {
  const c = cell();
  const f = new ForeignOutputs(() => c);
  f.sent({ header: { msg_id: 'mine', msg_type: 'execute_request' }, parent_header: {}, metadata: {}, content: {} });
  assert.equal(f.received(msg('stream', 'mine', { name: 'stdout', text: 'x' }, { chspawner_cell: 'c' })), false);
  assert.equal(f.received(msg('stream', 'r9', { name: 'stdout', text: 'x' })), false);
  assert.equal(f.received(msg('status', '', { execution_state: 'idle' }, { chspawner_cell: 'c' })), false);
  assert.deepEqual(c.outputs.items, []);
});

test('clear_output, at once or with wait, and a cell this notebook lacks', () => {
  const c = cell();
  const f = new ForeignOutputs(id => (id === 'here' ? c : null));
  const mark = { chspawner_cell: 'here' };
  f.received(msg('display_data', 'r', { data: { 'text/plain': 'a' }, metadata: {} }, mark));
  f.received(msg('clear_output', 'r', { wait: true }));
  assert.equal(c.outputs.items.length, 1);
  f.received(msg('stream', 'r', { name: 'stdout', text: 'b' }));
  assert.deepEqual(c.outputs.items, [{ output_type: 'stream', name: 'stdout', text: 'b' }]);
  f.received(msg('clear_output', 'r', { wait: false }));
  assert.deepEqual(c.outputs.items, []);
  assert.equal(f.received(msg('stream', 'q', { name: 'stdout', text: 'z' }, { chspawner_cell: 'elsewhere' })), false);
});
