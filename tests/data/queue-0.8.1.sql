-- The queue database as fractured 0.8.1 (before schema migrations) made it: its
-- tables from create_all, with a delivered study (instances, a delivery, an image
-- outcome, a shadow finding), a study whose delivery gave up, and one receiving.
-- Made once by driving that release's Queue with a fixed clock; sqlite3 iterdump.
BEGIN TRANSACTION;
CREATE TABLE deliveries (
	id INTEGER NOT NULL, 
	study_id INTEGER NOT NULL, 
	run INTEGER NOT NULL, 
	destination VARCHAR(64) NOT NULL, 
	sop_instance_uid VARCHAR(64) NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	path TEXT NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	next_attempt_at DATETIME NOT NULL, 
	last_status INTEGER, 
	last_error TEXT, 
	done_at DATETIME, 
	PRIMARY KEY (id), 
	FOREIGN KEY(study_id) REFERENCES studies (id)
);
INSERT INTO "deliveries" VALUES(1,1,1,'pacs','1.2.3.1.9','1.2.840.10008.5.1.4.1.1.88.34','/r/a.dcm','DONE',1,'2026-12-01 08:00:30.000000',0,NULL,'2026-12-01 08:00:30.000000');
INSERT INTO "deliveries" VALUES(2,2,1,'pacs','1.2.3.2.9','1.2.840.10008.5.1.4.1.1.88.34','/r/b.dcm','FAILED',1,'2026-12-01 08:01:00.000000',NULL,'association rejected',NULL);
CREATE TABLE image_outcomes (
	id INTEGER NOT NULL, 
	study_instance_uid VARCHAR(64) NOT NULL, 
	sop_instance_uid VARCHAR(64) NOT NULL, 
	run INTEGER NOT NULL, 
	recorded_at DATETIME NOT NULL, 
	model VARCHAR(128) NOT NULL, 
	region VARCHAR(16) NOT NULL, 
	scope VARCHAR(32) NOT NULL, 
	level VARCHAR(16), 
	probability FLOAT, 
	PRIMARY KEY (id)
);
INSERT INTO "image_outcomes" VALUES(1,'1.2.3.1','1.2.3.1.1',1,'2026-12-01 08:00:30.000000','fractured-0.8.1','hand','in_scope','possible',0.41);
CREATE TABLE instances (
	id INTEGER NOT NULL, 
	study_id INTEGER NOT NULL, 
	sop_instance_uid VARCHAR(64) NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	series_instance_uid VARCHAR(64) NOT NULL, 
	modality VARCHAR(16) NOT NULL, 
	path TEXT NOT NULL, 
	size INTEGER NOT NULL, 
	calling_ae VARCHAR(16) NOT NULL, 
	received_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(study_id) REFERENCES studies (id), 
	UNIQUE (sop_instance_uid)
);
INSERT INTO "instances" VALUES(1,1,'1.2.3.1.1','1.2.840.10008.5.1.4.1.1.1.1','1.2.3.1.1','DX','/var/lib/fractured/spool/incoming/1.2.3.1/1.2.3.1.1.dcm',1000,'MODALITY','2026-12-01 08:00:00.000000');
INSERT INTO "instances" VALUES(2,1,'1.2.3.1.2','1.2.840.10008.5.1.4.1.1.1.1','1.2.3.1.1','DX','/var/lib/fractured/spool/incoming/1.2.3.1/1.2.3.1.2.dcm',1000,'MODALITY','2026-12-01 08:00:00.000000');
INSERT INTO "instances" VALUES(3,2,'1.2.3.2.1','1.2.840.10008.5.1.4.1.1.1.1','1.2.3.2.1','DX','/var/lib/fractured/spool/incoming/1.2.3.2/1.2.3.2.1.dcm',1000,'MODALITY','2026-12-01 08:00:30.000000');
INSERT INTO "instances" VALUES(4,3,'1.2.3.3.1','1.2.840.10008.5.1.4.1.1.1.1','1.2.3.3.1','DX','/var/lib/fractured/spool/incoming/1.2.3.3/1.2.3.3.1.dcm',1000,'MODALITY','2026-12-01 08:01:00.000000');
CREATE TABLE shadow_findings (
	id INTEGER NOT NULL, 
	study_instance_uid VARCHAR(64) NOT NULL, 
	sop_instance_uid VARCHAR(64) NOT NULL, 
	run INTEGER NOT NULL, 
	recorded_at DATETIME NOT NULL, 
	active_model VARCHAR(128) NOT NULL, 
	active_probability FLOAT NOT NULL, 
	active_level VARCHAR(16) NOT NULL, 
	active_boxes INTEGER NOT NULL, 
	shadow_model VARCHAR(128) NOT NULL, 
	shadow_probability FLOAT NOT NULL, 
	shadow_level VARCHAR(16) NOT NULL, 
	shadow_boxes INTEGER NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "shadow_findings" VALUES(1,'1.2.3.1','1.2.3.1.1',1,'2026-12-01 08:00:30.000000','fractured-0.8.1',0.41,'possible',1,'fractured-0.9.0',0.38,'possible',0);
CREATE TABLE studies (
	id INTEGER NOT NULL, 
	study_instance_uid VARCHAR(64) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	first_received_at DATETIME NOT NULL, 
	last_received_at DATETIME NOT NULL, 
	claimed_by VARCHAR(128), 
	claimed_at DATETIME, 
	lease_until DATETIME, 
	runs INTEGER NOT NULL, 
	processed_at DATETIME, 
	reason TEXT, 
	PRIMARY KEY (id), 
	UNIQUE (study_instance_uid)
);
INSERT INTO "studies" VALUES(1,'1.2.3.1','DONE','2026-12-01 08:00:00.000000','2026-12-01 08:00:00.000000',NULL,'2026-12-01 08:00:30.000000',NULL,1,'2026-12-01 08:00:30.000000',NULL);
INSERT INTO "studies" VALUES(2,'1.2.3.2','FAILED','2026-12-01 08:00:30.000000','2026-12-01 08:00:30.000000',NULL,'2026-12-01 08:01:00.000000',NULL,1,'2026-12-01 08:01:00.000000','delivery failed after all attempts');
INSERT INTO "studies" VALUES(3,'1.2.3.3','RECEIVING','2026-12-01 08:01:00.000000','2026-12-01 08:01:00.000000',NULL,NULL,NULL,0,NULL,NULL);
CREATE INDEX ix_studies_state ON studies (state);
CREATE INDEX ix_shadow_findings_study_instance_uid ON shadow_findings (study_instance_uid);
CREATE INDEX ix_image_outcomes_recorded_at ON image_outcomes (recorded_at);
CREATE INDEX ix_image_outcomes_study_instance_uid ON image_outcomes (study_instance_uid);
CREATE INDEX ix_instances_study_id ON instances (study_id);
CREATE INDEX ix_deliveries_state ON deliveries (state);
CREATE INDEX ix_deliveries_study_id ON deliveries (study_id);
COMMIT;
