DROP TABLE IF EXISTS {workflow_steps};
DROP TABLE IF EXISTS {workflows};
