// Unit tests of sources.ts: when a save may replace the server's writes.
import { strict as assert } from 'node:assert';
import { test } from 'node:test';

import { onlyServerWrites, outputsRecord, sourcesOf } from '../sources';

function nb(sources: string[], record: any, outputs: any[] = []): any {
  return {
    metadata: record === null ? {} : { chspawner: { outputs: record } },
    cells: sources.map((s, i) => ({ id: `c${i}`, cell_type: 'code', source: s, outputs }))
  };
}

test("the server's writes of outputs the page has rendered may be saved over", () => {
  const page = sourcesOf(nb(['print(1)', 'x = 2'], null));
  const disk = nb(['print(1)', 'x = 2'], { kernel_id: 'k', seq: 50 }, [{ output_type: 'stream' }]);
  assert.equal(onlyServerWrites(disk, page, 'k', 50), true);
  assert.equal(onlyServerWrites(disk, page, 'k', 60), true);
  // Not yet rendered here, another kernel's, or no record at all: JupyterLab asks.
  assert.equal(onlyServerWrites(disk, page, 'k', 49), false);
  assert.equal(onlyServerWrites(disk, page, 'k', null), false);
  assert.equal(onlyServerWrites(disk, page, 'other', 50), false);
  assert.equal(onlyServerWrites(nb(['print(1)', 'x = 2'], null), page, 'k', 50), false);
  // Someone else changed a source: JupyterLab asks.
  assert.equal(onlyServerWrites(nb(['print(1)', 'x = 3'], { kernel_id: 'k', seq: 1 }), page, 'k', 50), false);
});

test('sources compare as text, whether stored as one string or as lines', () => {
  const asLines = { cells: [{ id: 'a', cell_type: 'code', source: ['a\n', 'b'] }] };
  const asText = { cells: [{ id: 'a', cell_type: 'code', source: 'a\nb' }] };
  assert.equal(sourcesOf(asLines), sourcesOf(asText));
  assert.equal(outputsRecord({ metadata: { chspawner: { outputs: { kernel_id: 'k', seq: '1' } } } }), null);
});
